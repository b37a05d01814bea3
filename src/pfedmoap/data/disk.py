"""Data sets read from a local root, in the layouts users already have. Never a download.

    data.root/
      caltech-101/101_ObjectCategories/<class>/*.jpg   + caltech-101/split_zhou_Caltech101.json
      oxford_pets/images/*.jpg                         + oxford_pets/split_zhou_OxfordPets.json
      oxford_flowers/jpg/*.jpg                         + oxford_flowers/split_zhou_OxfordFlowers.json
      food-101/images/<class>/*.jpg                    + food-101/split_zhou_Food101.json
      dtd/images/<class>/*.jpg                         + dtd/split_zhou_DescribableTextures.json
      cifar-10-batches-py/   (torchvision's on-disk format: data_batch_1..5, test_batch, batches.meta)
      cifar-100-python/      (train, test, meta; super-classes from the coarse labels)
      domainnet/<domain>/<class>/*.jpg          6 domains, the 10-class subset of FedBN / FedOTP
      office_caltech_10/<domain>/<class>/*      4 domains, 10 classes

`data.root` may also point at the data set's own folder (e.g. .../caltech-101). The CoOp split
json holds "train"/"val"/"test" lists of [relative_path, label, classname]: train -> train,
test -> test (val is unused). The multi-domain sets use split files when the layout ships them
(`<domain>_train.txt`/`<domain>_test.txt` with "path label" lines, or FedBN's
`<domain>_train.pkl`/`<domain>_test.pkl`), otherwise a deterministic 70/30 split per domain and
class (seeded by the file names, independent of the run seed).
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import zlib
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PFedMoAPError
from .base import FederatedDataset, ImageSplit
from .datasets import register

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TEST_FRACTION = 0.3
SHOWN_PROBLEMS = 20     # `data check` lists this many problems, then a count of the rest

# Set by check_root: the loaders add problems they would otherwise skip or stop at (a split file
# naming a missing image) to this list, and leave finding missing images to the full scan.
_PROBLEMS: ContextVar[list | None] = ContextVar("pfedmoap_data_check_problems", default=None)

DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
DOMAINNET_CLASSES = ["bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale",
                     "windmill", "wine_glass", "zebra"]
OFFICE_DOMAINS = ["amazon", "caltech", "dslr", "webcam"]
OFFICE_CLASSES = ["back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer",
                  "monitor", "mouse", "mug", "projector"]

# name -> (folder, image folder, split json, layout hint)
COOP = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
}


def readable(name: str) -> str:
    """'water_lily' -> 'water lily' (class names as words for prompts)."""
    return " ".join(str(name).replace("_", " ").split())


def _fail(name: str, path, expected: str, why: str = "not found") -> PFedMoAPError:
    return PFedMoAPError(f"data.root for {name}: {path} {why}; expected {expected}")


def _root(cfg, name: str, expected: str) -> Path:
    r = getattr(cfg, "root", "") or ""
    if not r:
        raise PFedMoAPError(f"data.root = '': {name} is read from a local folder; expected {expected}")
    p = Path(os.path.expanduser(str(r)))
    if not p.is_dir():
        raise _fail(name, p, expected, "is not a directory")
    return p


def _loader(name: str, paths: list[Path]):
    def load(i: int) -> Image.Image:
        p = paths[i]
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise PFedMoAPError(f"data.root for {name}: cannot read image {p} ({type(e).__name__})") from None
    return load


def _root_id(base: Path) -> str:
    """The data set's folder as an identity for the feature cache: its resolved absolute path."""
    return f"root:{base.resolve()}"


def _files_id(base: Path, files: list[Path]) -> str:
    """Identity of in-memory images read from `files` (CIFAR batches): the root and each file's size and mtime."""
    parts = [_root_id(base)]
    for p in files:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _no_domains(cfg, name: str) -> None:
    doms = list(getattr(cfg, "domains", []) or [])
    if doms and doms != ["all"]:
        raise PFedMoAPError(f"data.domains = {doms}: {name} has no domains; expected []")


def _select_domains(cfg, name: str, all_domains: list[str]) -> list[str]:
    doms = list(getattr(cfg, "domains", []) or [])
    bad = [d for d in doms if d not in all_domains]
    if bad:
        raise PFedMoAPError(f"data.domains = {doms}: {bad[0]!r} is not a domain of {name}; "
                            f"expected a subset of {all_domains}")
    return [d for d in all_domains if d in doms] if doms else list(all_domains)


# --------------------------------------------------------------------------- CoOp layout

def _coop(cfg, name: str) -> FederatedDataset:
    folder, imgdir, split = COOP[name]
    expected = f"ROOT/{folder}/{imgdir}/ and ROOT/{folder}/{split} (CoOp layout)"
    root = _root(cfg, name, expected)
    base = root / folder if (root / folder).is_dir() else root
    if not (base / split).is_file():
        # ROOT may be the folder itself; a ROOT that is neither lacks the folder the layout names
        raise _fail(name, base / split if base != root or (root / imgdir).is_dir() else root / folder, expected)
    if not (base / imgdir).is_dir():
        raise _fail(name, base / imgdir, expected)
    try:
        with open(base / split) as f:
            js = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(name, base / split, expected, f"is not valid JSON ({type(e).__name__})") from None
    if not isinstance(js, dict) or not all(isinstance(js.get(k), list) for k in ("train", "test")):
        raise _fail(name, base / split, expected + ' with "train" and "test" lists', "is malformed")

    names: dict[int, str] = {}
    splits = {}
    for part in ("train", "test", "val"):
        items = js.get(part) or []
        rel, lab = [], []
        for it in items:
            ok = (isinstance(it, (list, tuple)) and len(it) == 3 and isinstance(it[0], str)
                  and isinstance(it[1], int) and not isinstance(it[1], bool) and it[1] >= 0
                  and isinstance(it[2], str))
            if not ok:
                raise _fail(name, base / split, expected + " whose entries are [relative_path, label, classname]",
                            f"has a malformed {part!r} entry {str(it)[:80]}")
            if names.setdefault(it[1], it[2]) != it[2]:
                raise _fail(name, base / split, expected, f"gives label {it[1]} two class names "
                            f"({names[it[1]]!r}, {it[2]!r})")
            rel.append(it[0])
            lab.append(it[1])
        splits[part] = (rel, lab)
    n = max(names) + 1 if names else 0
    if n == 0 or sorted(names) != list(range(n)):
        raise _fail(name, base / split, expected, "has labels that are not 0..C-1")
    classnames = [names[i] for i in range(n)]
    if name == "oxford_flowers" and (base / "cat_to_name.json").is_file():
        # CoOp's split already holds the cat_to_name names; use the file only if the split lacks them
        if all(c.strip().isdigit() for c in classnames):
            try:
                cat = json.loads((base / "cat_to_name.json").read_text())
                classnames = [cat.get(str(i + 1), c) for i, c in enumerate(classnames)]
            except (OSError, ValueError):
                raise _fail(name, base / "cat_to_name.json", expected, "is not valid JSON") from None

    def make(part: str) -> ImageSplit:
        rel, lab = splits[part]
        paths = [base / imgdir / r for r in rel]
        return ImageSplit(_loader(name, paths), lab, None, keys=[f"{name}/{r}" for r in rel],
                          files=paths, identity=_root_id(base))

    train, test = make("train"), make("test")
    if len(train) == 0 or len(test) == 0:
        raise _fail(name, base / split, expected, "has an empty train or test list")
    for s, part in ((train, "train"), (test, "test")):   # cheap sanity check: first image exists
        p = base / imgdir / splits[part][0][0]
        if _PROBLEMS.get() is None and not p.is_file():     # (data check reports every missing one)
            raise _fail(name, p, expected, f"(first {part} image of the split) is missing")
    _no_domains(cfg, name)
    return FederatedDataset(name, [readable(c) for c in classnames], train, test)


@register("caltech101")
def build_caltech101(cfg):
    return _coop(cfg, "caltech101")


@register("oxford_pets")
def build_oxford_pets(cfg):
    return _coop(cfg, "oxford_pets")


@register("oxford_flowers")
def build_oxford_flowers(cfg):
    return _coop(cfg, "oxford_flowers")


@register("food101")
def build_food101(cfg):
    return _coop(cfg, "food101")


@register("dtd")
def build_dtd(cfg):
    return _coop(cfg, "dtd")


# --------------------------------------------------------------------------- untrusted pickles

def _numpy_helper(name: str):
    try:        # numpy >= 2 keeps the reconstruction helpers in numpy._core
        from numpy._core import multiarray, numeric
    except ImportError:   # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return getattr(numeric if name == "_frombuffer" else multiarray, name)


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as Python 3 pickles `bytes` at protocols 0-2: latin-1 only, nothing else."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {}
    for mod in ("builtins", "__builtin__"):           # Python 3 writes __builtin__ at protocols 0-2
        for obj in (set, frozenset, bytes, bytearray, complex):
            allowed[(mod, obj.__name__)] = obj
    allowed[("_codecs", "encode")] = _latin1_encode
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):        # files written under numpy 1.x and 2.x
        allowed[(f"{core}.multiarray", "_reconstruct")] = _numpy_helper("_reconstruct")
        allowed[(f"{core}.multiarray", "scalar")] = _checked_scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _checked_frombuffer
    return allowed


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _check_dtype(dt, raw_memory: bool) -> None:
    """A dtype is accepted only as numpy itself would build it from its type string, so that raw
    bytes are never read as object pointers: a pickle can relabel an int64 array as object dtype and
    clear the dtype's flags (its pickled state) so that numpy takes the array's bytes as pointers.
    Structured dtypes are refused (no data file of ours has them); object dtype only where its items
    come as Python objects, never as raw memory (`raw_memory`)."""
    if not isinstance(dt, np.dtype):
        raise _Refused(f"a numpy array whose dtype is a {type(dt).__name__}")
    if dt.fields is not None or dt.subdtype is not None:
        raise _Refused(f"a numpy array of structured dtype {dt}")
    canonical = np.dtype(dt.str)
    if dt.flags != canonical.flags or dt.itemsize != canonical.itemsize or dt.kind != canonical.kind:
        raise _Refused(f"a numpy {dt.name} dtype with forged flags (raw bytes relabelled as {dt.name})")
    if raw_memory and dt.hasobject:
        raise _Refused("a numpy object array given as raw memory")


def _checked_scalar(dtype, *args):
    _check_dtype(dtype, raw_memory=False)      # object dtype: numpy returns the object as given
    return _numpy_helper("scalar")(dtype, *args)


def _checked_frombuffer(buf, dtype, *args):
    _check_dtype(dtype, raw_memory=True)
    return _numpy_helper("_frombuffer")(buf, dtype, *args)


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler for data files from a shared directory: it builds plain containers, numbers,
    strings and numpy arrays, and refuses every other global (so a crafted file cannot run code).

    numpy arrays and dtypes are restored by BUILD (their __setstate__), which a crafted file can
    give any state: this pure-Python unpickler checks each such state first (`_check_dtype`), so an
    array never holds raw bytes read as object pointers (the C unpickler cannot be hooked there)."""

    def find_class(self, module: str, name: str):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {str(pid)[:40]!r}")

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.ndarray):
            if not (isinstance(state, tuple) and len(state) == 5):
                raise _Refused("a numpy array with a malformed state")
            dt, data = state[2], state[4]
            _check_dtype(dt, raw_memory=not isinstance(data, list))
        super().load_build()
        if isinstance(inst, np.dtype):
            _check_dtype(inst, raw_memory=False)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def _refused(path: Path, what: str) -> PFedMoAPError:
    return PFedMoAPError(f"{path}: refused to unpickle {what} (only plain containers, numbers, strings and "
                         f"numpy arrays are allowed)")


def safe_unpickle(path: Path, encoding: str = "latin1"):
    """pickle.load of an untrusted file with RestrictedUnpickler. A refused global is a
    PFedMoAPError naming the file and the global; any other failure propagates as is."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding=encoding).load()
        except _Refused as e:
            raise _refused(path, e.what) from None


def safe_np_load(path: Path):
    """np.load(path, allow_pickle=True) without running code: a .npy file is read without pickle,
    or (object arrays) with RestrictedUnpickler; any other file is read as a restricted pickle."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            f.seek(0)
            try:
                return RestrictedUnpickler(f, encoding="latin1").load()
            except _Refused as e:
                raise _refused(path, e.what) from None
        f.seek(0)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        try:
            arr = RestrictedUnpickler(f, encoding="latin1").load()
        except _Refused as e:
            raise _refused(path, e.what) from None
        if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
            raise ValueError("object array of another shape than its header")
        return arr


# --------------------------------------------------------------------------- CIFAR

def _unpickle(name: str, path: Path, expected: str) -> dict:
    if not path.is_file():
        raise _fail(name, path, expected)
    try:
        d = safe_unpickle(path, encoding="latin1")
    except PFedMoAPError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed root
        raise _fail(name, path, expected, f"is not a CIFAR pickle ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise _fail(name, path, expected, "is not a CIFAR pickle (no dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _names(values) -> list[str]:
    """Class names as text, whether the file holds Python 2 str (read as latin-1) or bytes."""
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_images(name: str, path: Path, d: dict, expected: str) -> np.ndarray:
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError) as e:
        raise _fail(name, path, expected, f"is malformed ({type(e).__name__}: data)") from None
    return np.ascontiguousarray(x)


def _array_split(name: str, images: np.ndarray, labels, tag: str, identity: str) -> ImageSplit:
    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i]).convert("RGB")
    return ImageSplit(load, labels, None, keys=[f"{name}/{tag}/{i}" for i in range(len(images))],
                      identity=identity)


def _cifar_dir(cfg, name: str, folder: str, expected: str) -> Path:
    root = _root(cfg, name, expected)
    base = root / folder if (root / folder).is_dir() else root
    if base.name != folder and not (base / ("batches.meta" if name == "cifar10" else "meta")).is_file():
        raise _fail(name, root / folder, expected)
    return base


@register("cifar10")
def build_cifar10(cfg):
    name = "cifar10"
    expected = "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (torchvision format)"
    base = _cifar_dir(cfg, name, "cifar-10-batches-py", expected)
    meta = _unpickle(name, base / "batches.meta", expected)
    xs, ys = [], []
    for i in range(1, 6):
        p = base / f"data_batch_{i}"
        d = _unpickle(name, p, expected)
        xs.append(_cifar_images(name, p, d, expected))
        ys.append(np.asarray(d.get("labels", []), np.int64))
        if len(ys[-1]) != len(xs[-1]):
            raise _fail(name, p, expected, "has labels and images of different lengths")
    p = base / "test_batch"
    d = _unpickle(name, p, expected)
    xte, yte = _cifar_images(name, p, d, expected), np.asarray(d.get("labels", []), np.int64)
    if len(xte) != len(yte):
        raise _fail(name, p, expected, "has labels and images of different lengths")
    classes = meta.get("label_names")
    if not classes:
        raise _fail(name, base / "batches.meta", expected, "has no label_names")
    _no_domains(cfg, name)
    return FederatedDataset(name, [readable(c) for c in _names(classes)],
                            _array_split(name, np.concatenate(xs), np.concatenate(ys), "train",
                                         _files_id(base, [base / f"data_batch_{i}" for i in range(1, 6)])),
                            _array_split(name, xte, yte, "test", _files_id(base, [base / "test_batch"])))


@register("cifar100")
def build_cifar100(cfg):
    name = "cifar100"
    expected = "ROOT/cifar-100-python/{train, test, meta} (torchvision format)"
    base = _cifar_dir(cfg, name, "cifar-100-python", expected)
    meta = _unpickle(name, base / "meta", expected)
    classes = meta.get("fine_label_names")
    if not classes:
        raise _fail(name, base / "meta", expected, "has no fine_label_names")
    out, sc = {}, np.full(len(classes), -1, np.int64)
    for part in ("train", "test"):
        p = base / part
        d = _unpickle(name, p, expected)
        x = _cifar_images(name, p, d, expected)
        fine = np.asarray(d.get("fine_labels", []), np.int64)
        coarse = np.asarray(d.get("coarse_labels", []), np.int64)
        if not (len(x) == len(fine) == len(coarse)):
            raise _fail(name, p, expected, "has fine/coarse labels and images of different lengths")
        if len(fine) and (fine.min() < 0 or fine.max() >= len(classes)):
            raise _fail(name, p, expected, "has fine labels outside the meta's class list")
        sc[fine] = coarse
        out[part] = _array_split(name, x, fine, part, _files_id(base, [p]))
    if np.any(sc < 0):
        sc = None   # a class never seen: no consistent super-class map
    _no_domains(cfg, name)
    return FederatedDataset(name, [readable(c) for c in _names(classes)], out["train"], out["test"], superclass=sc)


# --------------------------------------------------------------------------- multi-domain folders

def _det_split(files: list[str], key: str) -> tuple[list[str], list[str]]:
    """Deterministic train/test split of one (domain, class) folder: 70/30, seeded by the key."""
    files = sorted(files)
    n = len(files)
    if n < 2:
        return files, []
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    perm = rng.permutation(n)
    n_test = min(max(1, int(round(TEST_FRACTION * n))), n - 1)
    test = sorted(files[i] for i in perm[:n_test])
    train = sorted(files[i] for i in perm[n_test:])
    return train, test


def _read_split_file(base: Path, dom: str, part: str) -> list[str] | None:
    """Relative paths '<domain>/<class>/<file>' from a shipped split file, or None if there is none."""
    txt, pkl = base / f"{dom}_{part}.txt", base / f"{dom}_{part}.pkl"
    if txt.is_file():
        lines = [ln.split()[0] for ln in txt.read_text().splitlines() if ln.strip()]
    elif pkl.is_file():
        try:
            paths, _ = safe_np_load(pkl)
        except PFedMoAPError:
            raise       # a refused global: never silently fall back to another split
        except Exception:  # noqa: BLE001
            return None
        lines = [str(p) for p in paths]
    else:
        return None
    out = []
    for ln in lines:
        parts = Path(ln.replace("\\", "/")).parts
        if len(parts) >= 3:
            out.append("/".join(parts[-3:]))    # keep <domain>/<class>/<file>, whatever the prefix
    return out


def _domain_folders(cfg, name: str, folder: str, all_domains: list[str], classes: list[str] | None,
                    expected: str) -> FederatedDataset:
    root = _root(cfg, name, expected)
    base = root / folder if (root / folder).is_dir() else root
    domains = _select_domains(cfg, name, all_domains)
    dom_dirs = {}
    for d in domains:
        p = base / d
        if (p / "images").is_dir():            # Office-31 style <domain>/images/<class>/
            p = p / "images"
        if not p.is_dir():
            raise _fail(name, base / d, expected)
        dom_dirs[d] = p
    found = {d: sorted(c.name for c in p.iterdir() if c.is_dir()) for d, p in dom_dirs.items()}
    if classes is None:
        classes = found[domains[0]]
    for d in domains:
        missing = [c for c in classes if c not in found[d]]
        if missing or not classes:
            raise _fail(name, dom_dirs[d] / (missing[0] if missing else ""), expected,
                        f"(class folder{'s' if len(missing) > 1 else ''} {missing[:3]} of domain {d!r}) not found"
                        if missing else "has no class folders")
    cidx = {c: i for i, c in enumerate(classes)}

    rows = {"train": ([], [], [], []), "test": ([], [], [], [])}   # paths, labels, domains, keys
    for di, d in enumerate(domains):
        shipped = {part: _read_split_file(base, d, part) for part in ("train", "test")}
        use_files = all(v is not None for v in shipped.values())
        for c in classes:
            cdir = dom_dirs[d] / c
            files = [f.name for f in cdir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXT]
            if use_files:
                have = set(files)
                problems = _PROBLEMS.get()
                if problems is not None:     # entries naming absent images are skipped; data check says so
                    for part in ("train", "test"):
                        for r in sorted({r for r in shipped[part] if Path(r).parts[-2] == c
                                         and Path(r).name not in have}):
                            problems.append(("missing", f"{part}: {cdir / Path(r).name}: missing "
                                                        f"(named by {d}_{part} split file)"))
                split = {part: sorted({Path(r).name for r in shipped[part]
                                       if Path(r).parts[-2] == c and Path(r).name in have})
                         for part in ("train", "test")}
            else:
                tr, te = _det_split(files, f"{name}/{d}/{c}")
                split = {"train": tr, "test": te}
            for part, fs in split.items():
                P, L, D, K = rows[part]
                for fn in fs:
                    P.append(cdir / fn)
                    L.append(cidx[c])
                    D.append(di)
                    K.append(f"{name}/{d}/{c}/{fn}")
        if not any(dd == di for dd in rows["train"][2]):
            raise _fail(name, dom_dirs[d], expected, "holds no images")

    def make(part):
        P, L, D, K = rows[part]
        return ImageSplit(_loader(name, P), L, D, keys=K, files=P, identity=_root_id(base))

    return FederatedDataset(name, [readable(c) for c in classes], make("train"), make("test"),
                            domain_names=domains)


@register("domainnet")
def build_domainnet(cfg):
    expected = ("ROOT/domainnet/<domain>/<class>/*.jpg with domains " + "/".join(DOMAINNET_DOMAINS)
                + " and the 10 classes " + ",".join(DOMAINNET_CLASSES))
    return _domain_folders(cfg, "domainnet", "domainnet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES, expected)


@register("office_caltech10")
def build_office_caltech10(cfg):
    expected = ("ROOT/office_caltech_10/<domain>/<class>/* with domains " + "/".join(OFFICE_DOMAINS)
                + " and the 10 classes " + ",".join(OFFICE_CLASSES))
    return _domain_folders(cfg, "office_caltech10", "office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES,
                           expected)


# --------------------------------------------------------------------------- check

def _decode_file(p: Path) -> tuple[str, str] | None:
    """None when the image at p opens and decodes fully; else (kind, why)."""
    try:
        with Image.open(p) as im:
            im.convert("RGB")
    except (FileNotFoundError, NotADirectoryError):
        return "missing", "missing"
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image is unusable
        why = " ".join(str(e).split())[:120]
        return "undecodable", f"cannot decode ({type(e).__name__}{': ' + why if why else ''})"
    return None


def _scan(ds, problems: list) -> set[tuple[str, int]]:
    """Open and decode every image of both splits (each file once); add a problem per bad image.
    Returns the (split, index) pairs that failed."""
    from tqdm import tqdm

    bad: set[tuple[str, int]] = set()
    seen: dict[Path, tuple[str, str] | None] = {}
    total = len(ds.train) + len(ds.test)
    with tqdm(total=total, desc=f"data check {ds.name}", unit="image", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for tag, s in (("train", ds.train), ("test", ds.test)):
            files = getattr(s, "files", None)
            for i in range(len(s)):
                if files is not None:
                    p = files[i]
                    first = p not in seen
                    if first:
                        seen[p] = _decode_file(p)
                    if seen[p] is not None:
                        bad.add((tag, i))
                        if first:
                            problems.append((seen[p][0], f"{tag}: {p}: {seen[p][1]}"))
                else:
                    try:
                        s.load(i)
                    except Exception as e:  # noqa: BLE001
                        bad.add((tag, i))
                        problems.append(("undecodable", f"{tag}: {s.keys[i]}: cannot decode ({type(e).__name__})"))
                bar.update(1)
    return bad


class DataProblems(PFedMoAPError):
    """`data check` met missing or undecodable images: the one-line message, the description of the
    data set (`report`) and the problems (`listing`: the first SHOWN_PROBLEMS and a count of the rest)."""

    def __init__(self, message: str, report: str, listing: str):
        super().__init__(message)
        self.report, self.listing = report, listing


def check_root(cfg) -> str:
    """Load cfg.dataset from cfg.root, open and decode every image it uses, and describe it: split
    counts, classes, domains, a sample image.

    Raises PFedMoAPError (one line) when the root is missing or malformed, DataProblems when any
    image is missing or undecodable."""
    from .datasets import load_dataset

    problems: list[tuple[str, str]] = []
    token = _PROBLEMS.set(problems)
    try:
        ds = load_dataset(cfg)
    finally:
        _PROBLEMS.reset(token)
    bad = _scan(ds, problems)
    lines = [f"{ds.name}: root {getattr(cfg, 'root', '') or '(embedded)'}",
             f"  train {len(ds.train)} images, test {len(ds.test)} images, {ds.n_classes} classes"]
    shown = ", ".join(ds.classnames[:8]) + (", ..." if ds.n_classes > 8 else "")
    lines.append(f"  classes: {shown}")
    for tag, s in (("train", ds.train), ("test", ds.test)):
        cnt = np.bincount(s.labels, minlength=ds.n_classes)
        lines.append(f"  {tag} per class: min {cnt.min() if len(cnt) else 0}, max {cnt.max() if len(cnt) else 0}"
                     + (f", {int((cnt == 0).sum())} classes empty" if (cnt == 0).any() else ""))
    if len(ds.domain_names) > 1:
        tr = np.bincount(ds.train.domains, minlength=len(ds.domain_names))
        te = np.bincount(ds.test.domains, minlength=len(ds.domain_names))
        lines.append("  domains: " + ", ".join(f"{d} {a}/{b}" for d, a, b in zip(ds.domain_names, tr, te))
                     + " (train/test)")
    if ds.superclass is not None:
        lines.append(f"  super-classes: {len(np.unique(ds.superclass))}")
    for tag, s in (("train", ds.train), ("test", ds.test)):
        if len(s) and (tag, 0) not in bad:
            im = s.load(0)
            lines.append(f"  first {tag} image: {s.keys[0]} ({im.size[0]}x{im.size[1]}, "
                         f"label {s.labels[0]} = {ds.classnames[s.labels[0]]!r})")
    if not problems:
        return "\n".join(lines)
    n = len(problems)
    listed = [f"  {why}" for _, why in problems[:SHOWN_PROBLEMS]]
    if n > SHOWN_PROBLEMS:
        listed.append(f"  ... and {n - SHOWN_PROBLEMS} more")
    kinds = {k: sum(1 for kk, _ in problems if kk == k) for k in ("missing", "undecodable")}
    detail = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
    raise DataProblems(f"data check {ds.name} at {getattr(cfg, 'root', '') or '(embedded)'}: "
                       f"{n} image problem{'s' if n != 1 else ''} ({detail}); listed above",
                       "\n".join(lines), f"{ds.name}: {n} problem{'s' if n != 1 else ''}:\n" + "\n".join(listed))
