"""The frozen CLIP backbone: open_clip loading, freezing, image features.

Weights come from an open_clip pretrained tag (read from the local cache only, never the network),
a local weight file, the micro CLIP shipped in this package, or nowhere (random init).

OpenAI's CLIP weights were trained with QuickGELU. open_clip's plain model names (`RN50`,
`ViT-B-16`) build nn.GELU and only warn when given OpenAI weights, so whenever the weights are
OpenAI's - the `openai` tag (any tag whose open_clip entry says quick_gelu), OpenAI's released
TorchScript archives (`RN50.pt`, `ViT-B-16.pt`) or a state dict saved from one - the QuickGELU model
is built: the name's `-quickgelu` variant where open_clip has one (`RN50` -> `RN50-quickgelu`),
else the same config with QuickGELU forced.

Weight files: a TorchScript archive (OpenAI's releases, what the reference code's `clip` package
downloads) is read as data, its tensors only, without running any of its TorchScript
(`read_torchscript_state`; torch.jit.load would run it); anything else is read as tensors only:
`.safetensors`, or torch.load(weights_only=True) for open_clip state dicts (`.pt`, `.bin`,
`.pth`), which refuses pickles that would run code.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..errors import PFedMoAPError

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered: set[str] = set()


def register_model_configs(extra: str | Path | None = None) -> None:
    """Make the package's model configs (and an optional user JSON file) known to open_clip."""
    import open_clip
    for p in [_CONFIG_DIR] + ([Path(extra)] if extra else []):
        if str(p) not in _registered and p.exists():
            open_clip.add_model_config(p)
            _registered.add(str(p))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PFedMoAPError("model.device = 'cuda': no CUDA device is visible")
        # One rank per GPU: the launcher's local rank picks the card.
        local = next((int(os.environ[v]) for v in ("SLURM_LOCALID", "MPI_LOCALRANKID",
                      "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "LOCAL_RANK") if v in os.environ), 0)
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


class _NoRandomInitWarning(logging.Filter):
    """open_clip's warning (through the root logger) that no weights were loaded: weights, if any,
    are loaded next. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def _create_bare(open_clip, model_name: str, quick_gelu: bool = False):
    """The architecture with random weights."""
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)           # a logger's filter sees only the records logged on it: open_clip's
    try:
        return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(quiet)


# Keys only OpenAI's TorchScript CLIP has (ints in its state dict; not model parameters).
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def quickgelu_name(open_clip, model_name: str) -> str:
    """The open_clip name of `model_name` with QuickGELU: itself, or its `-quickgelu` variant."""
    if model_name.endswith("-quickgelu"):
        return model_name
    alt = f"{model_name}-quickgelu"
    return alt if alt in open_clip.list_models() else model_name


def tag_needs_quick_gelu(model_name: str, tag: str) -> bool:
    """Whether open_clip's pretrained tag was trained with QuickGELU (`openai` always is)."""
    from open_clip.pretrained import get_pretrained_cfg
    return tag == "openai" or bool((get_pretrained_cfg(model_name, tag) or {}).get("quick_gelu", False))


def is_torchscript_archive(path: str | Path) -> bool:
    """A TorchScript archive is a zip whose top folder holds `constants.pkl` (torch's own test)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# ---------------------------------------------------------------- TorchScript archives, read as data
#
# A TorchScript archive is a zip: <top>/data.pkl pickles the module tree (each module an object of
# class `__torch__.<...>` whose state is a dict of its attributes: tensors, submodules, plain
# values), its tensors' bytes are <top>/data/<key>, and <top>/code/**.py holds each class's
# TorchScript source, whose `__parameters__` / `__buffers__` lines name the attributes that
# state_dict() returns. data.pkl is read with an unpickler that builds only plain values, tensors
# (torch._utils._rebuild_tensor_v2 over the archive's storages) and inert module objects; the code is
# only read as text for those two lines. Nothing of the archive runs.

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
_CLASS = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*?)\]\n  __buffers__ = \[(.*?)\]\n", re.M)
_NAME = re.compile(r'"(\w+)"')


class _Refused(Exception):
    pass


class _ScriptModule:
    """A module object of the archive, inert: it only keeps the state it is given."""
    qualname = ""

    def __setstate__(self, state):
        self.state = state


class _Storage:
    def __init__(self, data: torch.Tensor):
        self.data = data            # 1-D, the storage's elements


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
    if not isinstance(storage, _Storage) or hooks not in (None, {}) or len(rest) > 1 or any(r is not None for r in rest):
        raise _Refused("a tensor of an unexpected form")
    try:
        return storage.data.as_strided(tuple(size), tuple(stride), int(offset)).clone()
    except (RuntimeError, TypeError, ValueError) as e:
        raise _Refused(f"a tensor outside its storage ({_first_line(e)})") from None


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, top: str):
        super().__init__(file, encoding="utf-8")
        self.archive, self.top, self.storages, self.classes = archive, top, {}, {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self.classes:
                self.classes[key] = type(name, (_ScriptModule,), {"qualname": key})
            return self.classes[key]
        raise _Refused(f"the global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"a persistent id {str(pid)[:60]}")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.top}/data/{key}")
            except KeyError:
                raise _Refused(f"a tensor whose data/{key} is missing") from None
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise _Refused(f"data/{key} of {len(raw)} bytes for {numel} elements of {dtype}")
            data = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = _Storage(data)
        return self.storages[key]


def _module_classes(archive: zipfile.ZipFile, top: str) -> dict[str, tuple[list[str], list[str]]]:
    """'__torch__.<module>.<Class>' -> (parameter names, buffer names), read from code/**.py as text."""
    out = {}
    code = f"{top}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8", "replace")
        if "def __setstate__" in text:
            raise _Refused(f"code that defines __setstate__ ({name[len(top) + 1:]})")
        for cls, params, buffers in _CLASS.findall(text):
            out[f"{module}.{cls}"] = (_NAME.findall(params), _NAME.findall(buffers))
    return out


def _state_dict(obj: _ScriptModule, classes: dict, prefix: str = "", out: dict | None = None) -> dict:
    """Parameters and buffers of the module tree, named as torch's state_dict() names them."""
    out = {} if out is None else out
    state = getattr(obj, "state", None)
    if obj.qualname not in classes or not isinstance(state, dict):
        raise _Refused(f"an object of class {obj.qualname} that is not a plain module")
    params, buffers = classes[obj.qualname]
    for name in params + buffers:
        value = state.get(name)
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise _Refused(f"{prefix}{name}: not a tensor")
            out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptModule):
            _state_dict(value, classes, f"{prefix}{name}.", out)
    return out


def read_torchscript_state(path: str | Path, what: str = "") -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers, as torch.jit.load(path).state_dict() gives it) of a
    TorchScript archive, read without running any of it. Anything but plain modules of tensors
    (another global, a class with its own __setstate__, a tensor outside its storage) is refused in
    one line (PFedMoAPError)."""
    what = what or f"{path}"
    try:
        with zipfile.ZipFile(path) as archive:
            tops = [n[:-len("/data.pkl")] for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(tops) != 1:
                raise _Refused("no single <top>/data.pkl")
            top = tops[0]
            order = archive.read(f"{top}/byteorder").strip() if f"{top}/byteorder" in archive.namelist() else b"little"
            if order != b"little":
                raise _Refused(f"tensors stored in byte order {order.decode(errors='replace')!r}")
            classes = _module_classes(archive, top)
            with archive.open(f"{top}/data.pkl") as fh:
                root = _ArchiveUnpickler(fh, archive, top).load()
        if not isinstance(root, _ScriptModule):
            raise _Refused("data.pkl does not hold a module")
        return _state_dict(root, classes)
    except _Refused as e:
        raise PFedMoAPError(f"{what}: refused: a TorchScript archive holding {e} (only OpenAI-style archives "
                            f"of plain modules and tensors are read, and none of their code is run)") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, IndexError) as e:
        raise PFedMoAPError(f"{what}: a damaged TorchScript archive ({type(e).__name__}: {_first_line(e)})") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A weight file -> (state dict of tensors, whether the weights are OpenAI's and need QuickGELU).

    Raises PFedMoAPError (one line) for a file that is neither a TorchScript archive, nor
    safetensors, nor a tensors-only torch checkpoint."""
    path = Path(path).expanduser()
    what = f"model.pretrained = {str(path)!r}"
    openai = False
    if is_torchscript_archive(path):
        # OpenAI's released RN50.pt / ViT-B-16.pt are TorchScript archives, which
        # torch.load(weights_only=True) refuses. torch.jit.load would run the archive's TorchScript
        # (a module's __setstate__ runs while loading: it can write any file), so the tensors are
        # read from the archive without it (`read_torchscript_state`).
        state = read_torchscript_state(path, what)
        openai = True
    elif path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise PFedMoAPError(f"{what}: not a readable safetensors file: {_first_line(e)}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - includes pickles that would run code: refused, not run
            raise PFedMoAPError(f"{what}: refused: not a TorchScript archive, safetensors file or tensors-only "
                                f"torch checkpoint (read with torch.load(weights_only=True)): "
                                f"{_first_line(e)}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise PFedMoAPError(f"{what}: holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    # A state dict saved from OpenAI's TorchScript model still carries its int entries.
    openai = openai or any(k in state for k in OPENAI_ONLY_KEYS)
    state = {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PFedMoAPError(f"{what}: entry {bad[0]!r} is not a tensor; expected a CLIP state dict")
    return state, openai


def load_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load a CLIP state dict (OpenAI or open_clip key names) into an open_clip model, strictly.
    Half-precision tensors (OpenAI's archives) are copied into the fp32 parameters exactly."""
    from open_clip.model import convert_to_custom_text_state_dict
    # A traced/scripted model also lists its non-persistent buffers (open_clip's attn_mask).
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in transient}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
    problems += [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
    problems += [f"{len(shapes)} of another shape, file vs model (e.g. {'; '.join(shapes[:2])})"] if shapes else []
    if problems:
        raise ValueError(f"another architecture: keys {', '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


class Backbone:
    """A frozen open_clip model in eval mode, with its tokenizer and eval preprocessing."""

    def __init__(self, name: str = "micro-clip", pretrained: str = "", device: str = "cpu",
                 precision: str = "fp32", seed: int = 0):
        import open_clip
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a tag must never wait on the network
        model_name = name
        if name.endswith(".json"):
            if not Path(name).is_file():
                raise PFedMoAPError(f"model.name = {name!r}: model-config file does not exist")
            register_model_configs(name)
            model_name = Path(name).stem
        else:
            register_model_configs()
        if model_name not in open_clip.list_models():
            raise PFedMoAPError(f"model.name = {name!r}: not an open_clip model nor a model-config JSON file "
                                f"(known: {', '.join(open_clip.list_models()[:8])}, ...)")
        self.device = resolve_device(device)
        self.precision = precision
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)      # random init must be the same on every rank and every run
            self.model, model_name = self._create(open_clip, model_name, pretrained)
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_config(model_name)
        self.preprocess = open_clip.image_transform(
            self.model.visual.image_size, is_train=False,
            mean=getattr(self.model.visual, "image_mean", None), std=getattr(self.model.visual, "image_std", None))
        self.embed_dim = cfg["embed_dim"]
        self.name, self.pretrained = model_name, pretrained
        self.weights_id = self._weights_id(pretrained, seed)
        self.logit_scale = float(self.model.logit_scale.exp())

    @staticmethod
    def _create(open_clip, model_name: str, pretrained: str):
        """-> (model, the open_clip name it was built as)."""
        if not pretrained:
            return _create_bare(open_clip, model_name), model_name
        if pretrained == "digits":
            from .micro import load_shipped_weights, MODEL_NAME
            if model_name != MODEL_NAME:
                raise PFedMoAPError(f"model.pretrained = 'digits': only exists for model.name = {MODEL_NAME!r}")
            model = _create_bare(open_clip, model_name)
            load_shipped_weights(model)
            return model, model_name
        if Path(pretrained).expanduser().is_file():
            state, openai = read_weights(pretrained)
            built = quickgelu_name(open_clip, model_name) if openai else model_name
            model = _create_bare(open_clip, built, quick_gelu=openai)
            try:
                load_state(model, state)
            except Exception as e:  # noqa: BLE001 - a foreign file: say which and why, in one line
                raise PFedMoAPError(f"model.pretrained = {pretrained!r}: cannot load into {built}: "
                                    f"{_first_line(e)}") from None
            return model, built
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise PFedMoAPError(f"model.pretrained = {pretrained!r}: neither a file nor a pretrained tag of "
                                f"{model_name} (tags: {', '.join(tags) or 'none'})")
        quick = tag_needs_quick_gelu(model_name, pretrained)
        built = quickgelu_name(open_clip, model_name) if quick else model_name
        if pretrained not in open_clip.list_pretrained_tags_by_model(built):
            built = model_name          # the variant lacks the tag: same config, QuickGELU forced
        try:
            return open_clip.create_model(built, pretrained=pretrained, force_quick_gelu=quick), built
        except Exception:  # noqa: BLE001 - offline cache miss
            raise PFedMoAPError(f"model.pretrained = {pretrained!r}: weights for {model_name} are not in the local "
                                f"cache and nothing is downloaded; pass the weight file's path instead (OpenAI's "
                                f"RN50.pt / ViT-B-16.pt, an open_clip .bin/.pt or a .safetensors)") from None

    @staticmethod
    def _weights_id(pretrained: str, seed: int) -> str:
        """What identifies the weights, for caches of features computed with them."""
        if not pretrained:
            return f"random-init:{seed}"
        if pretrained == "digits":
            from .micro import metadata
            return f"digits:{metadata()['weights_sha256']}"
        path = Path(pretrained).expanduser()
        if path.is_file():
            st = path.stat()
            return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return f"tag:{pretrained}"

    def autocast(self, cache: bool = True):
        if self.device.type == "cuda" and self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype, cache_enabled=cache)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> L2-normalised fp32 features (B, D) on the CPU."""
        with self.autocast():
            f = self.model.encode_image(images.to(self.device))
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Hand-written prompts -> L2-normalised fp32 features (n, D): the `zeroshot` path."""
        with self.autocast():
            f = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return torch.nn.functional.normalize(f.float(), dim=-1)
