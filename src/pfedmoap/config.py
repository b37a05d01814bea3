"""Typed run configuration: defaults here, a TOML file on top, `--set key=value` on top of that.

Every user mistake becomes one `PFedMoAPError` naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .errors import PFedMoAPError

# Names of methods, partitions, routers and data sets live in their registries (algorithms,
# data.partition, router, data.datasets); validation reads them there.
_SECTIONS: dict[str, type] = {}


def register_section(name: str):
    """A method's own config section ([name] in TOML, cfg.<name> in code), declared in its module."""
    def deco(cls):
        _SECTIONS[name] = cls
        return cls
    return deco


def _method_sections() -> dict[str, type]:
    from . import algorithms
    algorithms.names()          # importing every method module registers its section
    return _SECTIONS


@dataclass
class ModelConfig:
    name: str = "micro-clip"      # open_clip model name, or a path to a model-config JSON file
    pretrained: str = "digits"    # open_clip tag, a local checkpoint file, or "" for random init
    device: str = "cpu"           # cpu | cuda | auto
    precision: str = "fp32"       # autocast of the frozen towers on CUDA: fp32 | bf16 | fp16


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str = ""
    partition: str = "dirichlet"
    n_clients: int = 10
    beta: float = 0.5
    min_size: int = 10
    shots: int = 0                # 0 = all training images; else n per class per client
    classes_per_client: int = 0   # pathological: 0 = n_classes // n_clients
    domains: list[str] = field(default_factory=list)   # [] = every domain
    clients_per_domain: int = 1
    n_classes: int = 10           # synthetic only
    n_train: int = 2000           # synthetic only
    n_test: int = 1000            # synthetic only
    cache_dir: str = "~/.cache/pfedmoap"   # image-feature cache; "" keeps features in memory only
    augment_views: int = 0        # augment = "views": V augmented views (random resized crop + flip) cached per training image
    # Training augmentation: "none" (clean cached features), "views" (a random one of the
    # augment_views cached views per image and epoch), "fresh" (a new random resized crop + flip of
    # every image in every round and local epoch, as the reference's Dassl pipeline; precomputed
    # outside the training step). "none" with augment_views > 0 is "views" (configs from before this key).
    augment: str = "none"

    @property
    def augment_mode(self) -> str:
        return "views" if self.augment == "none" and self.augment_views > 0 else self.augment


@dataclass
class PromptConfig:
    n_ctx: int = 16
    init: str = ""                # "" = N(0, 0.02^2); else a phrase such as "a photo of a"
    template: str = "a photo of a {}."   # the hand prompt of `zeroshot`


@dataclass
class TrainConfig:
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.002
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    frac: float = 1.0             # fraction of clients sampled per round
    frac_rounding: str = "floor"  # participants per round: max(1, floor(frac*N)) as the reference, or "round"
    eval_batch_size: int = 512


@dataclass
class DPConfig:
    clip: float = 0.0             # per-upload L2 bound on the prompt; 0 = off
    noise_multiplier: float = 0.0  # Gaussian noise std = noise_multiplier * clip
    epsilon: float = 0.0          # client-level privacy budget after all rounds; 0 = not given (then noise_multiplier is used)
    delta: float = 1e-5           # delta of the (epsilon, delta) guarantee, reported and used for calibration


@dataclass
class RunConfig:
    threads: int = 1              # torch threads per rank (1: one process = N ranks bit for bit); 0 = all cores
    checkpoint_every: int = 5      # rounds between checkpoints; also at the end and on a signal
    progress: bool = True         # a progress bar on a terminal (one process); lines per round otherwise
    truncate_eos: bool = True     # exact fast path: cut the text sequence after the last EOS
    shared_prefix: bool = True    # exact fast path: encode [SOS]+ctx once for every class
    # Evaluation schedule: every eval_every-th round evaluates `eval_clients` ("all" clients, or only
    # the round's "participants"); the other rounds evaluate nobody; the last round evaluates every
    # client. Not evaluated: NaN in results.h5 (/rounds/evaluated says who was). It never changes what is
    # trained; a schedule other than the default is part of the run's identity (federation.run_hash).
    eval_every: int = 1
    eval_clients: str = "all"     # all | participants


@dataclass
class Config:
    seed: int = 1
    algorithm: str = "pfedmoap"
    rounds: int = 10
    out: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # method-owned sections (register_section), e.g. cfg.fedamp; in TOML at the top level like the rest
    sections: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name, cls in sorted(_method_sections().items()):
            self.sections.setdefault(name, cls())

    def __getattr__(self, name):          # only reached when ordinary lookup fails
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"Config has no attribute or section {name!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["sections"]
        d.update((name, dataclasses.asdict(sec)) for name, sec in sorted(self.sections.items()))
        return d

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def hash(self, exclude: tuple[str, ...] = ("out", "run")) -> str:
        """Identity of what a run computes (not where it writes or how fast)."""
        d = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(tomli_w.dumps(d).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- building a config

_INT_LIMIT = 2 ** 63


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _coerce(key: str, value, typ):
    """Check/convert `value` to the field type `typ`; strings from --set are parsed."""
    origin = typing.get_origin(typ)
    if origin is list:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PFedMoAPError(f"{key} = {value!r}: expected a list of strings")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PFedMoAPError(f"{key} = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise PFedMoAPError(f"{key} = {value!r}: expected an integer")
        if not isinstance(value, int):
            # a float (TOML 2.5 or 1e20) is refused, not truncated; so is "1e20" from --set
            try:
                value = int(str(value).strip())
            except ValueError:
                raise PFedMoAPError(f"{key} = {_short(value)}: expected an integer") from None
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise PFedMoAPError(f"{key} = {_short(value)}: out of range (expected a 64-bit integer)")
        return value
    if typ is float:
        if isinstance(value, bool):
            raise PFedMoAPError(f"{key} = {value!r}: expected a number")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise PFedMoAPError(f"{key} = {_short(value)}: expected a number") from None
        if not math.isfinite(out):
            raise PFedMoAPError(f"{key} = {value!r}: expected a finite number")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise PFedMoAPError(f"{key} = {value!r}: expected a string")
        return str(value)
    raise TypeError(typ)


def _fields(obj) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(type(obj))
    out = {f.name: hints[f.name] for f in dataclasses.fields(obj) if f.name != "sections"}
    if isinstance(obj, Config):
        out.update((name, type(sec)) for name, sec in obj.sections.items())
    return out


def _set(cfg: Config, key: str, value) -> None:
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        types = _fields(obj)
        if part not in types:
            where = ".".join(parts[:i]) or "top level"
            raise PFedMoAPError(f"{key}: unknown key (valid in {where}: {', '.join(types)})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types[part]):
                raise PFedMoAPError(f"{key}: is a section; set one of its keys, e.g. {key}.{_first(types[part])}")
            setattr(obj, part, _coerce(key, value, types[part]))
        else:
            if not dataclasses.is_dataclass(types[part]):
                raise PFedMoAPError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
            obj = getattr(obj, part)


def _first(cls) -> str:
    return dataclasses.fields(cls)[0].name


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def from_dict(d: dict, base: Config | None = None) -> Config:
    cfg = base if base is not None else Config()
    for key, value in _flatten(d):
        _set(cfg, key, value)
    return cfg


def _read_text(p: Path) -> str:
    """A config file's text; unreadable or not UTF-8 text (a binary file) is one line."""
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PFedMoAPError(f"config file {str(p)!r} is not a text (UTF-8) file: byte {e.start} "
                            f"cannot be decoded; expected TOML") from None
    except OSError as e:
        raise PFedMoAPError(f"config file {str(p)!r} cannot be read: {e.strerror}") from None


def load(path: str | None = None, overrides: list[str] = (), base: dict | None = None,
         overlays: list = ()) -> Config:
    """Defaults <- `base` (e.g. the quick-start) <- TOML file <- `overlays` in order <- `key=value`
    overrides; validated. An overlay is a partial config: a TOML file (a path, or a packaged name
    at any depth such as `paper/methods/coop`; `pfedmoap run CONFIG --with OVERLAY`) or a dict of
    keys (dotted or nested) to values, as a file would hold them."""
    from . import configs          # an existing file, else a packaged name such as paper/food101
    cfg = from_dict(base or {})
    for i, layer in enumerate(([path] if path else []) + list(overlays)):
        if isinstance(layer, dict):
            from_dict(layer, cfg)
            continue
        if i == 0 and path:
            p = configs.find(layer)
        else:
            p = Path(str(layer)).expanduser()
            key = str(layer).strip().removesuffix(".toml").strip("/")
            packaged = configs.ROOT / f"{key}.toml"
            if not p.is_file() and key and ".." not in key.split("/") and packaged.is_file():
                p = packaged
            elif not p.is_file():
                names = sorted(q.relative_to(configs.ROOT).with_suffix("").as_posix()
                               for q in configs.ROOT.glob("*/methods/*.toml"))
                raise PFedMoAPError(f"overlay {str(layer)!r} does not exist and is not a packaged overlay "
                                    f"(packaged: {', '.join(names) or 'none'})")
        try:
            from_dict(tomllib.loads(_read_text(p)), cfg)
        except tomllib.TOMLDecodeError as e:
            raise PFedMoAPError(f"config file {str(layer)!r} is not valid TOML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise PFedMoAPError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


def from_toml(text: str) -> Config:
    cfg = from_dict(tomllib.loads(text))
    validate(cfg)
    return cfg


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise PFedMoAPError(msg)


# Sanity bounds: beyond them a run would only fail (or never end) after minutes of start-up.
MAX_ROUNDS = 10 ** 6
MAX_CLIENTS = 10 ** 6
CLIP_CONTEXT = 77       # tokens of CLIP's text context: [SOS] ctx class-name "." [EOS]
FLOAT32_MAX = 3.4028234663852886e38


def _check_types(obj, prefix: str = "") -> None:
    """Every float finite and every int a 64-bit integer, also in a Config built in code."""
    for name, typ in _fields(obj).items():
        key, value = prefix + name, getattr(obj, name)
        if dataclasses.is_dataclass(typ):
            _check_types(value, key + ".")
        elif typ is float or typ is int:
            allowed = (int, float) if typ is float else int
            if not isinstance(value, allowed) or isinstance(value, bool):
                raise PFedMoAPError(f"{key} = {_short(value)}: expected {'a number' if typ is float else 'an integer'}")
            _coerce(key, value, typ)


def validate(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    _check_types(cfg)
    from . import algorithms
    from .data import partition
    _need(cfg.algorithm in algorithms.names(), f"algorithm = {cfg.algorithm!r}: expected one of {', '.join(algorithms.names())}")
    for sec in cfg.sections.values():
        if hasattr(sec, "validate"):
            sec.validate()
    _need(1 <= cfg.rounds <= MAX_ROUNDS, f"rounds = {cfg.rounds}: expected 1 to {MAX_ROUNDS}")
    _need(1 <= d.n_clients <= MAX_CLIENTS, f"data.n_clients = {d.n_clients}: expected 1 to {MAX_CLIENTS}")
    _need(d.partition in partition.names(), f"data.partition = {d.partition!r}: expected one of {', '.join(partition.names())}")
    _need(d.beta > 0, f"data.beta = {d.beta}: expected > 0")
    _need(d.shots >= 0, f"data.shots = {d.shots}: expected >= 0")
    _need(d.min_size >= 0, f"data.min_size = {d.min_size}: expected >= 0")
    _need(d.augment_views >= 0, f"data.augment_views = {d.augment_views}: expected >= 0 (0 = no augmentation)")
    _need(d.augment in ("none", "views", "fresh"), f"data.augment = {d.augment!r}: expected none, views or fresh")
    _need(d.augment != "views" or d.augment_views >= 1,
          f"data.augment = 'views' needs data.augment_views >= 1 (got {d.augment_views})")
    _need(d.augment != "fresh" or d.augment_views == 0,
          f"data.augment = 'fresh' draws a new view every epoch: data.augment_views = {d.augment_views} "
          f"is for 'views'; set it to 0")
    _need(d.clients_per_domain >= 1, f"data.clients_per_domain = {d.clients_per_domain}: expected >= 1")
    _need(d.n_classes >= 2, f"data.n_classes = {d.n_classes}: expected >= 2")
    _need(d.n_train >= 1 and d.n_test >= 1, "data.n_train and data.n_test: expected >= 1")
    if d.root:
        _need(Path(d.root).expanduser().is_dir(), f"data.root = {d.root!r}: directory does not exist")
    _need(t.frac_rounding in ("floor", "round"),
          f"train.frac_rounding = {t.frac_rounding!r}: expected floor (the reference's count) or round")
    _need(0 < t.frac <= 1, f"train.frac = {t.frac}: expected a fraction in (0, 1]")
    _need(t.local_epochs >= 1, f"train.local_epochs = {t.local_epochs}: expected >= 1")
    _need(t.batch_size >= 1, f"train.batch_size = {t.batch_size}: expected >= 1")
    _need(t.eval_batch_size >= 1, f"train.eval_batch_size = {t.eval_batch_size}: expected >= 1")
    _need(t.lr > 0, f"train.lr = {t.lr}: expected > 0")
    _need(t.local_epochs <= MAX_ROUNDS, f"train.local_epochs = {t.local_epochs}: expected <= {MAX_ROUNDS}")
    _need(0 <= t.warmup_epochs, f"train.warmup_epochs = {t.warmup_epochs}: expected >= 0")
    _need(t.warmup_lr >= 0, f"train.warmup_lr = {t.warmup_lr}: expected >= 0")
    _need(0 <= t.momentum < 1, f"train.momentum = {t.momentum}: expected 0 <= momentum < 1")
    _need(t.weight_decay >= 0, f"train.weight_decay = {t.weight_decay}: expected >= 0")
    # The exact check (the tokenised prompts with the real class names) runs at start-up; this one
    # is the cheap bound: [SOS], a class name of one token at least, "." and [EOS] take 4 tokens.
    _need(1 <= cfg.prompt.n_ctx <= CLIP_CONTEXT - 4,
          f"prompt.n_ctx = {cfg.prompt.n_ctx}: expected 1 to {CLIP_CONTEXT - 4} (CLIP's text context "
          f"holds {CLIP_CONTEXT} tokens, including the class name, '.' and start/end tokens)")
    _need("{}" in cfg.prompt.template, f"prompt.template = {cfg.prompt.template!r}: expected a '{{}}' for the class name")
    _need(cfg.dp.clip >= 0, f"dp.clip = {cfg.dp.clip}: expected >= 0 (0 = off)")
    _need(cfg.dp.noise_multiplier >= 0, f"dp.noise_multiplier = {cfg.dp.noise_multiplier}: expected >= 0")
    _need(cfg.dp.noise_multiplier == 0 or cfg.dp.clip > 0,
          "dp.noise_multiplier > 0 needs dp.clip > 0: the noise scale is noise_multiplier * clip")
    _need(0 < cfg.dp.delta < 1, f"dp.delta = {cfg.dp.delta}: expected 0 < delta < 1")
    _need(cfg.dp.epsilon >= 0, f"dp.epsilon = {cfg.dp.epsilon}: expected >= 0 (0 = give dp.noise_multiplier instead)")
    _need(cfg.dp.epsilon == 0 or (cfg.dp.clip > 0 and cfg.dp.noise_multiplier == 0),
          "dp.epsilon > 0 needs dp.clip > 0 and dp.noise_multiplier = 0: give the budget or the noise, not both")
    _need(cfg.dp.noise_multiplier * cfg.dp.clip < FLOAT32_MAX,
          f"dp.noise_multiplier * dp.clip = {cfg.dp.noise_multiplier * cfg.dp.clip:g}: the noise std must be "
          f"below {FLOAT32_MAX:.3g} (the largest float32) or every upload is infinite")
    _need(cfg.model.device in ("cpu", "cuda", "auto"), f"model.device = {cfg.model.device!r}: expected cpu, cuda or auto")
    _need(cfg.model.precision in ("fp32", "bf16", "fp16"), f"model.precision = {cfg.model.precision!r}: expected fp32, bf16 or fp16")
    _need(cfg.run.threads >= 0, f"run.threads = {cfg.run.threads}: expected >= 0 (0 = all cores)")
    _need(cfg.run.checkpoint_every >= 0, f"run.checkpoint_every = {cfg.run.checkpoint_every}: expected >= 0 (0 = only at the end)")
    _need(1 <= cfg.run.eval_every <= MAX_ROUNDS,
          f"run.eval_every = {cfg.run.eval_every}: expected 1 to {MAX_ROUNDS} (rounds between evaluations; "
          f"the last round is always evaluated)")
    _need(cfg.run.eval_clients in ("all", "participants"),
          f"run.eval_clients = {cfg.run.eval_clients!r}: expected all or participants")


# The embedded quick-start: the shipped micro CLIP on held-out digits with domain shift.
QUICKSTART = {
    "rounds": 5,
    "out": "runs/quickstart",
    "data": {"dataset": "digits", "partition": "dirichlet", "n_clients": 10, "beta": 0.5},
    # no warm-up epoch: with two local epochs CoOp's 1e-5 warm-up would spend half the training
    "train": {"local_epochs": 2, "warmup_epochs": 0},
}
# every method of the paper's comparison that is implemented, in the README's order
QUICKSTART_ALGORITHMS = ("zeroshot", "local", "promptfl", "promptfl_ft", "fedprox", "fedper", "fedamp",
                         "fedotp", "pfedmoap")
QUICKSTART_NOTE = ("The quick-start's budget is short (5 rounds x 2 local epochs): prompt learning without "
                   "personalisation is only level with the hand prompt here; the methods' default budget "
                   "(tools/compare_methods.sh, README) separates them.")
