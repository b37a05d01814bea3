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

# Names of partitions, routers and data sets live in their registries (data.partition, router,
# data.datasets); validation reads them there. Methods are registered by the method registry
# (pfedmoap.algorithms.register, which every method's manifest calls): config knows no method.


@dataclass(frozen=True)
class _Method:
    section: str                  # TOML section of its options, "" = none
    options: type | None          # dataclass of its options
    check: typing.Callable | None = None   # check(cfg): what the method needs of the shared sections


_METHODS: dict[str, _Method] = {}
_DEFAULT: dict[str, str] = {}     # "algorithm": the method of a config that names none


def register_method(name: str, section: str = "", options: type | None = None, default: bool = False,
                    check=None) -> None:
    """A method's name, options section and check(cfg) (called by pfedmoap.algorithms.register)."""
    _METHODS[name] = _Method(section, options, check)
    if default:
        _DEFAULT["algorithm"] = name


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)
    if _DEFAULT.get("algorithm") == name:
        del _DEFAULT["algorithm"]


def _options_for(algorithm: str):
    """A fresh default options instance of `algorithm` (None: it has none, or it is unknown)."""
    m = _METHODS.get(algorithm)
    return m.options() if m is not None and m.options is not None else None


def added(default=dataclasses.MISSING, *, factory=dataclasses.MISSING):
    """A key (or section) added after runs were recorded: at its default it is left out of the run's
    identity (Config.hash), so that every run recorded before it keeps its hash; any other value is
    hashed. A section added so is left out when every key of it is."""
    return field(default=default, default_factory=factory, metadata={"added": True})


def _identity(obj) -> dict:
    """The dict of a section (or the config) as its identity hashes it: `added` keys at their default left out."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "options":
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            sub = _identity(v)
            if sub or not f.metadata.get("added"):
                out[f.name] = sub
        elif not (f.metadata.get("added") and v == _default(f)):
            out[f.name] = v
    return out


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _owners(section: str) -> list[str]:
    """The registered methods whose options section is `section`."""
    return sorted(name for name, m in _METHODS.items() if m.section and m.section == section)


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
    template: str = "a photo of a {}."   # the hand prompt (of the frozen-CLIP baseline)


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
    # a sampled participant fails to return its upload with this probability (keyed by seed, round, client)
    drop_rate: float = added(0.0)
    # B: a rank trains (and evaluates) its hosted clients a block of B at a time in one batched computation
    client_block: int = added(1)


@dataclass
class DPConfig:
    clip: float = 0.0             # L2 bound C, 0 = off: per local step on the gradient ("gradient") or on the upload ("upload")
    mechanism: str = "gradient"   # gradient (the paper's: clip each step's gradient, noise the upload) | upload
    noise_multiplier: float = 0.0  # sigma: the upload's Gaussian noise std = sigma * its L2 sensitivity (docs/privacy.md)
    epsilon: float = 0.0          # client-level privacy budget after all rounds; 0 = not given (then noise_multiplier is used)
    delta: float = 1e-5           # delta of the (epsilon, delta) guarantee, reported and used for calibration


@dataclass
class RunConfig:
    threads: int = 1              # torch threads per rank (1: one process = N ranks bit for bit); 0 = all cores
    checkpoint_every: int = 5      # rounds between checkpoints; also at the end and on a signal
    progress: bool = True         # a progress bar on a terminal (one process); lines per round otherwise
    truncate_eos: bool = True     # exact fast path: cut the text sequence after the last EOS
    shared_prefix: bool = True    # exact fast path: encode [SOS]+ctx once for every class
    # CUDA only: capture the fixed-shape differentiable text pass in a CUDA graph (launch overhead);
    # ignored with a warning on the CPU, falls back to the eager pass where capture fails
    cuda_graph: bool = False
    # Evaluation schedule: every eval_every-th round evaluates `eval_clients` ("all" clients, or only
    # the round's "participants"); the other rounds evaluate nobody; the last round evaluates every
    # client. Not evaluated: NaN in results.h5 (/rounds/evaluated says who was). It never changes what is
    # trained; a schedule other than the default is part of the run's identity (run_hash).
    eval_every: int = 1
    eval_clients: str = "all"     # all | participants


@dataclass
class EvalConfig:
    # What a round reports besides each client's accuracy on its own test split (docs/protocols.md):
    # personal (only that) | base2novel | leave_one_domain_out | cross_dataset | dual
    protocol: str = added("personal")
    # leave_one_domain_out: the domain (of data.dataset) no client trains on; every client's model
    # is evaluated on its test images
    held_out: str = added("")
    # cross_dataset: the data sets (names as data.dataset; loaded with the run's [data] keys, every
    # domain) whose test sets every client's model is evaluated on, with their own class names
    targets: list[str] = added(factory=list)


@dataclass
class Config:
    seed: int = 1
    algorithm: str = ""           # a registered method; "" = the default one (its manifest says default=True)
    rounds: int = 10
    out: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = added(factory=EvalConfig)
    # The algorithm's own options (its manifest's options class; in TOML its manifest's section),
    # None if it has none. A config holds only its own method's options: another method's section
    # is not part of it (config files may carry them; see `load`).
    options: typing.Any = None

    def __post_init__(self):
        if not self.algorithm:
            self.algorithm = _DEFAULT.get("algorithm", "")
        if self.options is None:
            self.options = _options_for(self.algorithm)

    @property
    def section(self) -> str:
        """The TOML section of this config's options ("" if its method has none)."""
        m = _METHODS.get(self.algorithm)
        return m.section if m is not None and self.options is not None else ""

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        if self.section:
            d[self.section] = dataclasses.asdict(self.options)
        return d

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def hash(self, exclude: tuple[str, ...] = ("out", "run")) -> str:
        """Identity of what a run computes (not where it writes or how fast): the shared sections
        and its own method's options, nothing of another method (docs/hdf5-layout.md)."""
        d = _identity(self)
        if self.section:
            d[self.section] = dataclasses.asdict(self.options)
        return _digest({k: v for k, v in d.items() if k not in exclude})


def _digest(d: dict) -> str:
    return hashlib.sha256(tomli_w.dumps(d).encode()).hexdigest()[:16]


def _with_schedule(config_hash: str, run: RunConfig) -> str:
    if run.eval_every == 1 and run.eval_clients == "all":
        return config_hash
    key = f"{config_hash}|eval_every={run.eval_every}|eval_clients={run.eval_clients}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def run_hash(cfg: Config) -> str:
    """The run's identity (checkpoints, results.h5 `config_hash`): Config.hash, which leaves out [run],
    plus a non-default evaluation schedule. The schedule changes no training (no method's training
    depends on its evaluation: tests/test_eval_invariance.py), but it decides which rounds results.h5
    holds evaluated and so what `report` computes from them (acc last 5 on the rounds that evaluated
    every client); so a run is resumed only under the schedule that wrote it, and the identities of
    runs already written stay valid. The default schedule keeps the plain hash."""
    return _with_schedule(cfg.hash(), cfg.run)


def recorded_run_hash(attrs: dict) -> str:
    """The run hash, in today's scheme, of a checkpoint's or results.h5's attributes (`config`,
    `config_hash`): what resuming and `tables.is_complete` compare with run_hash(cfg).

    Files written before issue 20 record a legacy hash, taken over every method's section (each
    config then held them all): such a hash is recognised by recomputing it from the config text
    the file records, and then stands for the run hash of that config as read today (its own
    method's section only). Anything else is returned as recorded (docs/hdf5-layout.md)."""
    recorded, text = str(attrs.get("config_hash", "")), attrs.get("config")
    if not isinstance(text, str):
        return recorded
    try:
        cfg = from_toml(text)
        legacy = _with_schedule(_digest({k: v for k, v in tomllib.loads(text).items() if k not in ("out", "run")}),
                                cfg.run)
    except (PFedMoAPError, tomllib.TOMLDecodeError):
        return recorded            # e.g. a method no longer registered: no run of it can match
    return run_hash(cfg) if recorded == legacy else recorded


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
    out = {f.name: hints[f.name] for f in dataclasses.fields(obj) if f.name != "options"}
    if isinstance(obj, Config) and obj.section:
        out[obj.section] = type(obj.options)
    return out


def _get(obj, name: str):
    """A field of a section, or of the config (its method's section is its `options`)."""
    return obj.options if isinstance(obj, Config) and name == obj.section else getattr(obj, name)


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
            value = _coerce(key, value, types[part])
            if obj is cfg and part == "algorithm" and value != cfg.algorithm:
                cfg.algorithm, cfg.options = value, None
                cfg.__post_init__()             # the new method's default options
            else:
                setattr(obj, part, value)
        else:
            if not dataclasses.is_dataclass(types[part]):
                raise PFedMoAPError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
            obj = _get(obj, part)


def _apply(cfg: Config, key: str, value, other: str) -> None:
    """`key = value` into `cfg`, whose algorithm is already final. A key of another registered
    method's section is checked against that method's options and left out of `cfg`
    (other = "skip"), or refused (other = "refuse")."""
    section = key.split(".", 1)[0]
    if key == "algorithm":
        _coerce(key, value, str)               # set before (the last layer's value wins)
        return
    owners = _owners(section)
    if "." in key and section != cfg.section and owners and section not in _fields(cfg):
        if other == "refuse":
            raise PFedMoAPError(f"{key}: [{section}] holds the options of algorithm {owners[0]!r}, and this "
                                f"run's algorithm is {cfg.algorithm!r}; set algorithm = {owners[0]!r} or "
                                f"leave the key out")
        _set(Config(algorithm=owners[0]), key, value)     # checked, not kept
        return
    _set(cfg, key, value)


def _first(cls) -> str:
    return dataclasses.fields(cls)[0].name


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def _algorithm(items: list[tuple[str, typing.Any, str]], default: str = "") -> str:
    """The algorithm the layers' items name last (the run's), else `default`."""
    named = [v for k, v, _ in items if k == "algorithm"]
    return _coerce("algorithm", named[-1], str) if named else default


def _build(items: list[tuple[str, typing.Any, str]], base: Config | None = None) -> Config:
    """A config from (key, value, how another method's key is treated) items, in order: the
    algorithm first (a config holds that method's options only), then every key."""
    cfg = base if base is not None else Config()
    algorithm = _algorithm(items, cfg.algorithm)
    if algorithm != cfg.algorithm:
        _set(cfg, "algorithm", algorithm)
    for key, value, other in items:
        _apply(cfg, key, value, other)
    return cfg


def from_dict(d: dict, base: Config | None = None) -> Config:
    """`d` (nested or dotted keys, as a TOML file holds them) on top of `base` (default: a new Config).
    Another method's sections are checked and left out (a config file may hold several methods')."""
    return _build([(k, v, "skip") for k, v in _flatten(d)], base)


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
         overlays: list = (), *, other_methods: str = "refuse") -> Config:
    """Defaults <- `base` (e.g. the quick-start) <- TOML file <- `overlays` in order <- `key=value`
    overrides; validated. An overlay is a partial config: a TOML file (a path, or a packaged name
    at any depth such as `paper/methods/coop`; `pfedmoap run CONFIG --with OVERLAY`) or a dict of
    keys (dotted or nested) to values, as a file would hold them.

    The config holds the options of the algorithm the last layer names, only. Another method's
    section in `base`, a file or an overlay (a data-set config may hold one method's section for the
    runs of every method) is checked and left out; in `overrides` it is refused (`other_methods =
    "refuse"`: the key would change nothing), or left out too ("skip": overrides shared by the
    runs of several methods, as the quick-start's and a table's)."""
    from . import configs          # an existing file, else a packaged name such as paper/food101
    if other_methods not in ("refuse", "skip"):
        raise ValueError(other_methods)
    items = [(k, v, "skip") for k, v in _flatten(base or {})]
    for i, layer in enumerate(([path] if path else []) + list(overlays)):
        if isinstance(layer, dict):
            items += [(k, v, "skip") for k, v in _flatten(layer)]
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
            items += [(k, v, "skip") for k, v in _flatten(tomllib.loads(_read_text(p)))]
        except tomllib.TOMLDecodeError as e:
            raise PFedMoAPError(f"config file {str(layer)!r} is not valid TOML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise PFedMoAPError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        items.append((key.strip(), value.strip(), other_methods))
    cfg = _build(items)
    validate(cfg)
    return cfg


def from_toml(text: str) -> Config:
    """A config from its TOML text (config.toml, a checkpoint's record); validated."""
    cfg = from_dict(tomllib.loads(text))
    validate(cfg)
    return cfg


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise PFedMoAPError(msg)


PROTOCOLS = ("personal", "base2novel", "leave_one_domain_out", "cross_dataset", "dual")

# Sanity bounds: beyond them a run would only fail (or never end) after minutes of start-up.
MAX_ROUNDS = 10 ** 6
MAX_CLIENTS = 10 ** 6
CLIP_CONTEXT = 77       # tokens of CLIP's text context: [SOS] ctx class-name "." [EOS]
FLOAT32_MAX = 3.4028234663852886e38


def _check_types(obj, prefix: str = "") -> None:
    """Every float finite and every int a 64-bit integer, also in a Config built in code."""
    for name, typ in _fields(obj).items():
        key, value = prefix + name, _get(obj, name)
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
    from .data import partition
    _need(cfg.algorithm in _METHODS, f"algorithm = {cfg.algorithm!r}: expected one of {', '.join(sorted(_METHODS))}")
    want = _METHODS[cfg.algorithm].options
    _need(want is None and cfg.options is None or want is not None and type(cfg.options) is want,
          f"options = {cfg.options!r}: algorithm = {cfg.algorithm!r} expects "
          f"{'no options' if want is None else want.__name__}")
    if hasattr(cfg.options, "validate"):
        cfg.options.validate()
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
    _need(0 <= t.drop_rate < 1, f"train.drop_rate = {t.drop_rate}: expected 0 <= drop_rate < 1")
    _need(t.client_block >= 1, f"train.client_block = {t.client_block}: expected >= 1 (1: one client at a time)")
    _need(cfg.eval.protocol in PROTOCOLS,
          f"eval.protocol = {cfg.eval.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    _validate_eval(cfg)
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
    _need(cfg.dp.mechanism in ("gradient", "upload"),
          f"dp.mechanism = {cfg.dp.mechanism!r}: expected one of gradient, upload")
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
    if _METHODS[cfg.algorithm].check is not None:      # the method's needs of the shared sections
        _METHODS[cfg.algorithm].check(cfg)


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _need(e.protocol != "leave_one_domain_out" or e.held_out,
          "eval.protocol = 'leave_one_domain_out' needs eval.held_out (the domain no client trains on)")
    _need(not e.held_out or e.protocol == "leave_one_domain_out",
          f"eval.held_out = {e.held_out!r}: only for eval.protocol = 'leave_one_domain_out' "
          f"(got {e.protocol!r})")
    _need(isinstance(e.targets, list) and all(isinstance(t, str) for t in e.targets),
          f"eval.targets = {_short(e.targets)}: expected a list of data-set names")
    _need(e.protocol != "cross_dataset" or e.targets,
          "eval.protocol = 'cross_dataset' needs eval.targets (the data sets to evaluate on)")
    _need(not e.targets or e.protocol == "cross_dataset",
          f"eval.targets = {e.targets!r}: only for eval.protocol = 'cross_dataset' (got {e.protocol!r})")
    _need(len(set(e.targets)) == len(e.targets), f"eval.targets = {e.targets!r}: a data set is listed twice")
    if e.targets:
        from .data.datasets import available
        names = available()
        for t in e.targets:
            _need(t in names, f"eval.targets: {t!r} is not a data set; expected some of {', '.join(names)}")


# The embedded quick-start: the shipped micro CLIP on held-out digits with domain shift.
QUICKSTART = {
    "rounds": 5,
    "out": "runs/quickstart",
    "data": {"dataset": "digits", "partition": "dirichlet", "n_clients": 10, "beta": 0.5},
    # no warm-up epoch: with two local epochs CoOp's 1e-5 warm-up would spend half the training
    "train": {"local_epochs": 2, "warmup_epochs": 0},
}
QUICKSTART_NOTE = ("The quick-start's budget is short (5 rounds x 2 local epochs): prompt learning without "
                   "personalisation is only level with the hand prompt here; the methods' default budget "
                   "(tools/compare_methods.sh, README) separates them.")
