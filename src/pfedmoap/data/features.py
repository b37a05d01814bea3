"""Frozen image features: computed once per image, kept in memory, optionally cached in HDF5.

Images are encoded in fixed chunks of the data set's own index order, so a feature never depends on
which other images a rank happened to need (identical results at any number of ranks).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import rng, store
from ..errors import PFedMoAPError

CHUNK = 256


def train_transform(backbone):
    """CoOp's training augmentation: random resized crop and horizontal flip, then CLIP's normalisation."""
    from torchvision import transforms as T
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    normalize = next(t for t in backbone.preprocess.transforms if isinstance(t, T.Normalize))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), normalize])


def cache_key(backbone, dataset, split_name: str, view: int | None = None, kind: str = "pooled") -> str:
    """What the cached features of one split (and view) depend on: the backbone's weights and
    preprocessing, the images' names and where their content comes from (see `content_id`).
    `kind` "dense" (see `write_dense`) keys another file; "pooled" keeps the keys of older caches."""
    split = getattr(dataset, split_name)
    h = hashlib.sha256()
    extra = () if kind == "pooled" else (f"kind={kind}", DENSE_FORMAT)
    for part in (backbone.name, backbone.weights_id, str(backbone.preprocess), dataset.name, split_name,
                 backbone.precision, f"view={view}", *extra, *split.keys, content_id(split)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def content_id(split) -> str:
    """An id of the split's image content, cheap to take.

    Images on disk (`split.files`): the split's `identity` (the data set's resolved root), or each
    file's absolute path when there is none, and each file's size and mtime_ns: one stat per file,
    nothing read, so another root with the same layout, or an image rewritten in place, is another
    id. In-memory images: their `identity` (a pixel hash, or the source files' stats); failing
    that, a hash of every image's pixels (computed once per split object)."""
    files = getattr(split, "files", None)
    identity = getattr(split, "identity", None)
    if files is None:
        if identity:
            return identity
        cached = getattr(split, "_pixels_id", None)
        if cached is None:
            h = hashlib.sha256()
            for i in range(len(split)):
                a = np.ascontiguousarray(np.asarray(split.load(i)))
                h.update(f"{a.shape}|{a.dtype.str}|".encode())
                h.update(a.tobytes())
            cached = "pixels:" + h.hexdigest()
            split._pixels_id = cached
        return cached
    h = hashlib.sha256((identity or "").encode() + b"\0")
    for p in files:
        try:
            st = os.stat(p)
        except OSError as e:
            raise PFedMoAPError(f"image {p}: cannot stat it for the feature cache's key "
                                f"({e.strerror or type(e).__name__})") from None
        name = "" if identity else os.path.abspath(p)
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return "files:" + h.hexdigest()


def compute(backbone, split, indices: np.ndarray | None = None, view: int | None = None) -> np.ndarray:
    """Features (len(split), D) float32; rows outside `indices` (when given) are left at zero.

    `view` None: CLIP's eval preprocessing. `view` v: augmented view v, whose random crop and flip
    are keyed by (v, image index) alone, so every run and every rank sees the same view v."""
    n = len(split)
    feats = np.zeros((n, backbone.embed_dim), np.float32)
    need = np.ones(n, bool) if indices is None else np.isin(np.arange(n), indices)
    transform = backbone.preprocess if view is None else train_transform(backbone)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        if not need[start:stop].any():
            continue
        images = []
        with torch.random.fork_rng(devices=[]):
            for i in range(start, stop):
                if view is not None:
                    torch.manual_seed(rng.key(0, "augment", view, i))
                images.append(transform(split.load(i)))
        feats[start:stop] = backbone.encode_images(torch.stack(images)).numpy()
    return feats


def cache_path(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"features-{key}.h5"


def read(path: Path, n: int, dim: int) -> np.ndarray | None:
    """The cached features, or None when the file is missing or does not match."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            x = f["features"][()]
    except (OSError, KeyError):
        return None
    return x if x.shape == (n, dim) else None


def write(path: Path, feats: np.ndarray) -> None:
    """Atomic: a temporary file renamed over the target, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PFedMoAPError(f"data.cache_dir = {str(path.parent)!r}: cannot create: {e.strerror}") from None
    with _cache_file(path) as f:
        f.create_dataset("features", data=feats)


@contextlib.contextmanager
def _cache_file(path: Path):
    """`with _cache_file(path) as f:` a new cache file written through a temporary file renamed over
    `path` at the end. A write that fails (a full disk, a quota, a read-only file system) closes
    every HDF5 object (store.new_h5), removes the temporary file and is one line naming
    data.cache_dir; nothing is left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with store.new_h5(tmp) as f:
            yield f
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:
        if not store.is_write_failure(e):
            raise
        raise PFedMoAPError(f"data.cache_dir = {str(path.parent)!r}: the feature cache {path.name} could not be "
                            f"written ({store.write_failure(e)}); free space or set data.cache_dir to a directory "
                            f"with room (or to \"\" for no cache)") from None
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------- dense (patch) features
#
# For methods whose manifest needs dense features (`DataNeeds(dense=True)`: FedOTP): one pass of the
# visual tower gives the pooled feature (B, D) and M dense features (B, M, D)
# (`pfedmoap.clip.dense`; ModifiedResNet towers in the FedOTP reference's "attention" reading). Both
# are L2-normalised; the dense ones are then rounded to float16, in memory as in the HDF5 cache, so
# a run reads the same numbers whether its features came from the cache or were just computed (half
# the memory, and the cosine similarities OT needs lose ~1e-3 relative). The pooled feature stays
# float32.  Cache file (data.cache_dir/features-<key>.h5, key with kind="dense"): datasets
# "features" (n, D) float32 and "dense" (n, M, D) float16, chunked by DENSE_ROWS images; written
# image chunk by image chunk (memory bounded by one chunk), read back a block at a time for the rows
# a rank needs (no rank holds the whole split's dense features).

DENSE_FORMAT = "dense-v1:l2-normalised:float16:resnet=attention"
DENSE_DTYPE = np.float16
DENSE_ROWS = 16              # HDF5 chunk: images per chunk of the "dense" dataset


def check_dense(backbone) -> None:
    """Refuse, in one line, a visual tower without dense features."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer
    visual = backbone.model.visual
    ok = isinstance(visual, ModifiedResNet) or (isinstance(visual, VisionTransformer)
                                                and getattr(visual, "attn_pool", None) is None)
    if not ok:
        raise PFedMoAPError(f"model.name = {backbone.name!r}: its visual tower ({type(visual).__name__}) has no "
                            f"dense (patch) features, which this method needs; use an open_clip ViT or "
                            f"ModifiedResNet (RN50, ...) model")


def _encode_dense(backbone, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from ..clip.dense import dense_image_features
    with torch.no_grad(), backbone.autocast():
        x, dense = dense_image_features(backbone.model, images.to(backbone.device))
    x = torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()
    dense = torch.nn.functional.normalize(dense.float(), dim=-1).to(torch.float16).cpu().numpy()
    return x, dense


def dense_shape(backbone) -> tuple[int, int]:
    """(M, D): dense features per image and their width (one forward pass of a blank image)."""
    size = backbone.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    _, dense = _encode_dense(backbone, torch.zeros(1, 3, *size))
    return dense.shape[1], dense.shape[2]


def _dense_chunks(backbone, split, need: np.ndarray):
    """(start, stop, features, dense) for each fixed chunk of the split holding a needed image
    (the same chunks at any number of ranks, as `compute`)."""
    for start in range(0, len(split), CHUNK):
        stop = min(start + CHUNK, len(split))
        if need[start:stop].any():
            images = torch.stack([backbone.preprocess(split.load(i)) for i in range(start, stop)])
            yield (start, stop, *_encode_dense(backbone, images))


def compute_dense(backbone, split, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features of the images `indices` (sorted, unique): ((k, D) float32, (k, M, D) float16), in
    the order of `indices`; only the chunks holding them are encoded, only their rows are kept."""
    indices = np.asarray(indices, np.int64)
    M, D = dense_shape(backbone)
    x = np.zeros((len(indices), D), np.float32)
    dense = np.zeros((len(indices), M, D), DENSE_DTYPE)
    need = np.zeros(len(split), bool)
    need[indices] = True
    for start, stop, fx, fd in _dense_chunks(backbone, split, need):
        lo, hi = np.searchsorted(indices, [start, stop])
        x[lo:hi] = fx[indices[lo:hi] - start]
        dense[lo:hi] = fd[indices[lo:hi] - start]
    return x, dense


def write_dense(path: Path, backbone, split) -> None:
    """Encode the whole split into `path`, chunk by chunk; atomic as `write`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PFedMoAPError(f"data.cache_dir = {str(path.parent)!r}: cannot create: {e.strerror}") from None
    n = len(split)
    M, D = dense_shape(backbone)
    with _cache_file(path) as f:
        fx = f.create_dataset("features", (n, D), np.float32)
        fd = f.create_dataset("dense", (n, M, D), DENSE_DTYPE, chunks=(max(1, min(DENSE_ROWS, n)), M, D))
        f.attrs["format"] = DENSE_FORMAT
        for start, stop, x, dense in _dense_chunks(backbone, split, np.ones(n, bool)):
            fx[start:stop] = x
            fd[start:stop] = dense


def read_dense(path: Path, n: int, shape: tuple[int, int], indices: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached rows `indices` (sorted, unique) as `compute_dense` gives them, or None when the
    file is missing or does not match (n images, (M, D) = shape). Reads a block at a time."""
    if not path.exists():
        return None
    M, D = shape
    indices = np.asarray(indices, np.int64)
    try:
        with h5py.File(path, "r") as f:
            fx, fd = f["features"], f["dense"]
            if (f.attrs.get("format") != DENSE_FORMAT or fx.shape != (n, D) or fd.shape != (n, M, D)
                    or fd.dtype != DENSE_DTYPE):
                return None
            x = np.zeros((len(indices), D), np.float32)
            dense = np.zeros((len(indices), M, D), DENSE_DTYPE)
            for start in range(0, n, CHUNK):
                lo, hi = np.searchsorted(indices, [start, start + CHUNK])
                if lo == hi:
                    continue
                stop = int(indices[hi - 1]) + 1
                first = int(indices[lo])
                x[lo:hi] = fx[first:stop][indices[lo:hi] - first]
                dense[lo:hi] = fd[first:stop][indices[lo:hi] - first]
    except (OSError, KeyError):
        return None
    return x, dense


# ---------------------------------------------------------------------------- fresh augmented views
#
# data.augment = "fresh" (the reference's Dassl pipeline): every training image gets a new random
# resized crop + horizontal flip (`train_transform`) in every (round, local epoch). The view of
# image i in local epoch e of round r is keyed by (seed, i, r, e) alone (`fresh_seed`), so it is the
# same at any number of ranks, on resume, and for every method.
#
# Encoded outside the training step, in batches of one client's images for one epoch (at most
# CHUNK images, in the client's own order): a client lives on one rank, so its batches, and thus
# the bits of its features, never depend on the number of ranks. `FreshViews` holds, per rank, one
# (client, round) block (E, n, D) at a time; with data.cache_dir set every block is one HDF5 file,
# precomputed at start-up for the rounds the client is expected to train in (see build.py).

FRESH_FORMAT = "fresh-v1:seed(key(seed,'fresh-view/epoch<e>',round,image)):batches=client-epoch-chunks"


def fresh_seed(seed: int, image: int, round_: int, epoch: int) -> int:
    """The torch seed of the crop and flip of `image` in local epoch `epoch` of round `round_`."""
    return rng.key(seed, f"fresh-view/epoch{epoch}", round_, image)


def compute_fresh(backbone, split, indices: np.ndarray, seed: int, round_: int, epoch: int,
                  transform=None) -> np.ndarray:
    """(len(indices), D) float32: the fresh view of each image `indices` (in that order) for
    (round, epoch), encoded in chunks of CHUNK of that order."""
    transform = transform or train_transform(backbone)
    indices = np.asarray(indices, np.int64)
    out = np.zeros((len(indices), backbone.embed_dim), np.float32)
    for start in range(0, len(indices), CHUNK):
        images = []
        with torch.random.fork_rng(devices=[]):
            for i in indices[start:start + CHUNK]:
                torch.manual_seed(fresh_seed(seed, int(i), round_, epoch))
                images.append(transform(split.load(int(i))))
        out[start:start + len(images)] = backbone.encode_images(torch.stack(images)).numpy()
    return out


class FreshViews:
    """The fresh views of the training images of one rank's clients (data.augment = "fresh").

    `images[c]`: client c's training image ids, in the order of its ClientData rows. `block(c, r)`
    -> (E, n_c, D) on `device` for E = `epochs`: read from the cache file, or computed (and written
    when `cache_dir` is set). Only the last block asked for is kept in memory."""

    def __init__(self, backbone, dataset, images: dict[int, np.ndarray], seed: int, epochs: int,
                 cache_dir: str = "", device="cpu"):
        self.backbone, self.split, self.images = backbone, dataset.train, images
        self.seed, self.epochs, self.cache_dir, self.device = seed, epochs, cache_dir, device
        self.transform = train_transform(backbone)
        self._base = None
        if cache_dir:
            h = hashlib.sha256()
            for part in (backbone.name, backbone.weights_id, str(backbone.preprocess), backbone.precision,
                         dataset.name, "train", FRESH_FORMAT, str(self.transform), f"seed={seed}",
                         *self.split.keys, content_id(self.split)):
                h.update(part.encode() + b"\0")
            self._base = h.hexdigest()
        self._held: tuple[int, int, torch.Tensor] | None = None
        self.computed = 0           # blocks encoded by this object (for tests and reports)

    # -------------------------------------------------------------- cache files
    def path(self, cid: int, round_: int) -> Path | None:
        """The cache file of client cid's block of round `round_` (None without data.cache_dir): keyed
        by the weights, preprocessing, data, augmentation, seed, round, epochs and the client's images."""
        if self._base is None:
            return None
        ids = np.ascontiguousarray(self.images[cid], np.int64)
        h = hashlib.sha256(f"{self._base}/round={round_}/epochs={self.epochs}/".encode())
        h.update(ids.tobytes())
        return Path(self.cache_dir).expanduser() / "fresh-views" / f"views-{h.hexdigest()[:24]}.h5"

    def _shape(self, cid: int) -> tuple[int, int, int]:
        return self.epochs, len(self.images[cid]), self.backbone.embed_dim

    def cached(self, cid: int, round_: int) -> bool:
        """The block's file exists and has the right shape (nothing read but its header)."""
        p = self.path(cid, round_)
        if p is None or not p.exists():
            return False
        try:
            with h5py.File(p, "r") as f:
                return f["features"].shape == self._shape(cid) and f.attrs.get("format") == FRESH_FORMAT
        except (OSError, KeyError):
            return False

    def compute(self, cid: int, round_: int) -> np.ndarray:
        """Encode client cid's block of round `round_`: one batch (chunk) per epoch and CHUNK images."""
        self.computed += 1
        ids = self.images[cid]
        return np.stack([compute_fresh(self.backbone, self.split, ids, self.seed, round_, e, self.transform)
                         for e in range(self.epochs)]) if len(ids) else np.zeros(self._shape(cid), np.float32)

    def _write(self, path: Path, x: np.ndarray, round_: int) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PFedMoAPError(f"data.cache_dir = {str(path.parent.parent)!r}: cannot create: {e.strerror}") from None
        with _cache_file(path) as f:
            f.create_dataset("features", data=x)
            f.attrs.update(format=FRESH_FORMAT, round=round_, seed=self.seed)

    def precompute(self, cid: int, round_: int) -> bool:
        """Make sure the block's cache file exists (computed and written if not); True if computed.
        Without data.cache_dir nothing is kept: blocks are computed when first asked for."""
        if self._base is None or self.cached(cid, round_):
            return False
        self._write(self.path(cid, round_), self.compute(cid, round_), round_)
        return True

    # -------------------------------------------------------------- the training side
    def block(self, cid: int, round_: int) -> torch.Tensor:
        """(E, n_c, D): client cid's views of round `round_` (the one block held in memory)."""
        if self._held is not None and self._held[:2] == (cid, round_):
            return self._held[2]
        self._held = None               # at most one block in memory
        x = None
        path = self.path(cid, round_)
        if path is not None and self.cached(cid, round_):
            try:
                with h5py.File(path, "r") as f:
                    x = f["features"][()]
            except (OSError, KeyError):
                x = None
        if x is None:                   # no cache, or a round nobody expected this client in
            x = self.compute(cid, round_)
            if path is not None:
                self._write(path, x, round_)
        t = torch.from_numpy(x).to(self.device)
        self._held = (cid, round_, t)
        return t

    def features(self, cid: int, round_: int, epoch: int) -> torch.Tensor:
        """(n_c, D): client cid's training features for local epoch `epoch` of round `round_`."""
        if epoch >= self.epochs:        # more epochs than train.local_epochs: encoded on demand
            x = compute_fresh(self.backbone, self.split, self.images[cid], self.seed, round_, epoch, self.transform)
            return torch.from_numpy(x).to(self.device)
        return self.block(cid, round_)[epoch]

    def for_client(self, cid: int):
        """The client's `ClientData.fresh_views`: (round, epoch) -> (n_c, D)."""
        return lambda round_, epoch: self.features(cid, round_, epoch)


# ---------------------------------------------------------------------------- images for the image tower
#
# For methods whose manifest needs the images (`DataNeeds(images=True)`: they train inside the image
# tower, so frozen features cannot serve them). The test images and the clean training images are
# preprocessed once (CLIP's eval preprocessing); the training views are made when an epoch asks for
# them, with exactly the crops and flips the cached features of the same data.augment would have
# (view v of image i keyed by (v, i) as `compute`; the fresh view by `fresh_seed`), so they never
# depend on the number of ranks, on resume, or on which other images a rank holds.

class ClientImages:
    """One client's images, (k, 3, H, W) float32 on `device`.

    `test`: its test images; `train(round, epoch, gen)`: its training images of that local epoch:
    the clean ones (data.augment "none"), a random one of `views` views per image drawn from `gen`
    ("views": the draw ClientData.train_features makes), or each image's fresh view ("fresh")."""

    def __init__(self, backbone, dataset, train_ids: np.ndarray, test_ids: np.ndarray, seed: int,
                 mode: str = "none", views: int = 0, device="cpu"):
        self.split, self.seed, self.mode, self.views, self.device = dataset.train, seed, mode, views, device
        self.train_ids = np.asarray(train_ids, np.int64)
        self.preprocess, self.augment = backbone.preprocess, train_transform(backbone)
        self.clean = self._stack(dataset.train, self.train_ids, self.preprocess)
        self.test = self._stack(dataset.test, np.asarray(test_ids, np.int64), self.preprocess)

    def _stack(self, split, ids, transform, seeds=None) -> torch.Tensor:
        if len(ids) == 0:           # a client without images here: an empty batch of the right shape
            probe = self.preprocess(split.load(0)) if len(split) else torch.zeros(3, 1, 1)
            return torch.zeros((0, *probe.shape)).to(self.device)
        out = []
        with torch.random.fork_rng(devices=[]):
            for k, i in enumerate(ids):
                if seeds is not None:
                    torch.manual_seed(seeds[k])
                out.append(transform(split.load(int(i))))
        return torch.stack(out).to(self.device)

    def train(self, round_: int, epoch: int, gen: torch.Generator | None = None) -> torch.Tensor:
        ids = self.train_ids
        if self.mode == "views" and self.views:
            view = torch.randint(self.views, (len(ids),), generator=gen)
            seeds = [rng.key(0, "augment", int(v), int(i)) for v, i in zip(view, ids)]
        elif self.mode == "fresh":
            seeds = [fresh_seed(self.seed, int(i), round_, epoch) for i in ids]
        else:
            return self.clean
        return self._stack(self.split, ids, self.augment, seeds)
