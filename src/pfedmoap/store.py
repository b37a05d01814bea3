"""HDF5 run files: `results.h5` (every round) and `checkpoint.h5` (to resume). Layout: docs/hdf5-layout.md.

Rank 0 is the only writer. Both files are written whole to a temporary file, flushed, synced and
renamed over the old one: a job killed at any moment leaves the previous file intact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import PFedMoAPError

SCHEMA_VERSION = 2          # 2: method-declared round logs, checkpoint groups /clients and /server
READABLE_RESULTS = (1, 2)   # results.h5 of schema 1 hold the same round fields (no method-declared logs)
RESULTS, CHECKPOINT = "results.h5", "checkpoint.h5"


@dataclass(frozen=True)
class Field:
    dtype: type
    units: str
    description: str


# The round fields every method has; a method adds its own (algorithms.base.Log).
ROUND_FIELDS = {
    "accuracy": Field(np.float32, "fraction", "top-1 accuracy on the client's own test split"),
    "macro_f1": Field(np.float32, "fraction", "macro-F1 on the client's own test split"),
    "loss": Field(np.float32, "nats", "mean cross-entropy on the client's own test split"),
    "participated": Field(np.bool_, "bool", "the client trained in this round (1) or not (0)"),
    "domain_accuracy": Field(np.float32, "fraction", "accuracy per domain of the client's test split; "
                             "NaN where it has no image of that domain"),
    "bytes_up": Field(np.int64, "bytes", "payload bytes the client sent this round"),
    "bytes_down": Field(np.int64, "bytes", "payload bytes the client received this round"),
    "phase_time": Field(np.float32, "seconds", "wall seconds per rank and phase (attr phases)"),
    "wall_time": Field(np.float32, "seconds", "wall seconds of the whole round"),
    "dp_epsilon": Field(np.float64, "epsilon", "client-level (epsilon, dp_delta)-DP spent by the end of the "
                        "round (RDP accountant, dp.py); inf with clipping but no noise; NaN with DP off"),
}


@dataclass
class RoundRecord:
    """One round of the log: per client (N,) arrays, per rank timings, the method's own logs."""
    accuracy: np.ndarray
    macro_f1: np.ndarray
    loss: np.ndarray
    participated: np.ndarray
    domain_accuracy: np.ndarray          # (N, n_domains)
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    phase_time: np.ndarray               # (ranks, phases)
    wall_time: float
    dp_epsilon: float = float("nan")
    logs: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (N, *shape)


def library_versions() -> str:
    return f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"


def _atomic_write(path: Path, fill) -> None:
    """Write `path` whole through a temporary file, fsync, rename: a job killed at any moment
    leaves the previous file intact. A write that fails (a full disk, a quota, a read-only file
    system) removes the temporary file and is one clear error; the previous file stays."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:       # h5py reports a failed flush/close as RuntimeError
        _failed_write(path, tmp, e)


def write_text(path: Path, text: str) -> None:
    """A small text file written atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _failed_write(path, tmp, e)


def _failed_write(path: Path, tmp: Path, err: BaseException) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
    raise PFedMoAPError(f"{path}: could not be written ({reason}); the previous version, if any, is "
                        f"intact (full disk or quota? free space, then resume)") from None


class Results:
    """The results log held by rank 0 and rewritten atomically after every round.

    `logs` declares the method's own per-client logs: name -> (dtype, units, description)."""

    def __init__(self, run_dir: Path, attrs: dict, partition: dict, phases: list[str],
                 logs: dict[str, Field] | None = None):
        self.path = Path(run_dir) / RESULTS
        self.attrs = {"schema_version": SCHEMA_VERSION, "package_version": __version__,
                      "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "rounds_done": 0, "status": "running", **attrs}
        self.partition = partition
        self.phases = phases
        self.log_fields = dict(logs or {})
        self.records: list[RoundRecord] = []

    def append(self, record: RoundRecord) -> None:
        if set(record.logs) != set(self.log_fields):
            raise ValueError(f"round logs {sorted(record.logs)} != declared {sorted(self.log_fields)}")
        self.records.append(record)
        self.attrs["rounds_done"] = len(self.records)

    def add_time(self, seconds: float, phase: str = "write") -> None:
        """Time rank 0 spent on the last round after it was recorded (writing it)."""
        rec = self.records[-1]
        rec.phase_time[0, self.phases.index(phase)] += seconds
        rec.wall_time += seconds

    def columns(self) -> dict[str, np.ndarray]:
        """Every round field stacked over the rounds: name -> (R, ...)."""
        out = {}
        if not self.records:
            return out
        for k, f in ROUND_FIELDS.items():
            rows = [np.asarray(getattr(r, k), f.dtype) for r in self.records]
            out[k] = np.stack(_pad_ranks(rows) if k == "phase_time" else rows)
        for k, f in self.log_fields.items():
            out[k] = np.stack([np.asarray(r.logs[k], f.dtype) for r in self.records])
        return out

    def write(self, status: str | None = None) -> None:
        if status:
            self.attrs["status"] = status

        def fill(f):
            for k, v in self.attrs.items():
                f.attrs[k] = v
            g = f.create_group("partition")
            for k, v in self.partition.items():
                if k in ("classnames", "domain_names"):
                    g.attrs[k] = list(v)
                else:
                    g.create_dataset(k, data=v)
            r = f.create_group("rounds")
            info = {**ROUND_FIELDS, **self.log_fields}
            for k, v in self.columns().items():
                ds = r.create_dataset(k, data=v)
                ds.attrs["units"] = info[k].units
                ds.attrs["description"] = info[k].description
            if "phase_time" in r:
                r["phase_time"].attrs["phases"] = self.phases
        _atomic_write(self.path, fill)

    @classmethod
    def reopen(cls, run_dir: Path, n_rounds: int, logs: dict[str, Field] | None = None) -> "Results":
        """The log of a run being resumed, cut back to its first `n_rounds` rounds."""
        data = read_results(run_dir)
        res = cls(run_dir, {}, dict(data["partition"]), [], logs)
        res.attrs = dict(data["attrs"])
        cols = data["rounds"]
        res.phases = list(cols.pop("phases", []))
        have = len(cols.get("accuracy", ()))
        if have < n_rounds:
            raise PFedMoAPError(f"{res.path}: holds {have} rounds but the checkpoint {n_rounds}; "
                                f"the run directory is inconsistent")
        for i in range(n_rounds):
            res.records.append(RoundRecord(**{k: cols[k][i] for k in ROUND_FIELDS if k not in ("wall_time", "dp_epsilon")},
                                           wall_time=float(cols["wall_time"][i]),
                                           dp_epsilon=float(cols["dp_epsilon"][i]),
                                           logs={k: cols[k][i] for k in res.log_fields}))
        res.attrs["rounds_done"] = n_rounds
        res.attrs["status"] = "running"
        return res


REQUIRED_ATTRS = ("schema_version", "package_version", "config", "algorithm", "dataset",
                  "partition", "seed", "world_size", "start_time", "n_clients", "n_classes",
                  "n_rounds", "rounds_done", "status")
_EXPECTED = f"expected a pfedmoap run directory or its {RESULTS} (docs/hdf5-layout.md)"


def results_file(path: str | Path) -> Path:
    """The results.h5 of a run given as its directory or as the file itself."""
    path = Path(path)
    if path.is_dir():
        file = path / RESULTS
        if file.is_file():
            return file
        runs = sum(1 for sub in path.iterdir() if (sub / RESULTS).is_file())
        hint = f" (it holds {runs} run directories: pass them, e.g. {path}/*)" if runs else ""
        raise PFedMoAPError(f"{path}: no {RESULTS} in this directory{hint}; {_EXPECTED}")
    if not path.exists():
        raise PFedMoAPError(f"{path}: no such file or directory; {_EXPECTED}")
    return path


def _pad_ranks(rows: list[np.ndarray]) -> list[np.ndarray]:
    """A resumed run may have another world size: per-rank timings are NaN-padded to the widest."""
    w = max(x.shape[0] for x in rows)
    return [np.pad(x, ((0, w - x.shape[0]), (0, 0)), constant_values=np.nan) for x in rows]


def read_results(path: str | Path) -> dict:
    """Everything in a results.h5 as plain Python and numpy:
    `{"attrs": {...}, "partition": {name: ndarray, "classnames": [str]},
    "rounds": {name: ndarray, "phases": [str]}}`.

    Root attributes are checked only for the schema this package writes; a file of another
    schema_version is returned as found so the caller can report it. Opens without HDF5 file locking
    so that a run still being written can be read (rows may be one round behind `rounds_done`)."""
    file = results_file(path)
    if not h5py.is_hdf5(file):
        raise PFedMoAPError(f"{file}: not an HDF5 file; {_EXPECTED}")
    try:
        with h5py.File(file, "r", locking=False) as h5:
            attrs = {key: _plain(value) for key, value in h5.attrs.items()}
            missing = [key for key in REQUIRED_ATTRS if key not in attrs]
            if "schema_version" in attrs and attrs["schema_version"] not in READABLE_RESULTS:
                missing = []
            if missing:
                raise PFedMoAPError(f"{file}: missing root attribute(s) {', '.join(missing)}; "
                                    f"{_EXPECTED}")
            partition = _read_group(h5, "partition", "classnames")
            if "partition" in h5:
                partition["domain_names"] = _plain(h5["partition"].attrs.get("domain_names", []))
            rounds = _read_group(h5, "rounds", None)
            if "phase_time" in rounds:
                rounds["phases"] = _plain(h5["rounds/phase_time"].attrs.get("phases", []))
    except OSError as err:
        raise PFedMoAPError(f"{file}: unreadable HDF5 ({str(err).splitlines()[0]}); "
                            f"{_EXPECTED}") from err
    return {"attrs": attrs, "partition": partition, "rounds": rounds}


def _read_group(h5: h5py.File, name: str, list_attr: str | None) -> dict:
    group = h5.get(name)
    if not isinstance(group, h5py.Group):
        return {}
    out = {key: item[()] for key, item in group.items() if isinstance(item, h5py.Dataset)}
    if list_attr is not None:
        out[list_attr] = _plain(group.attrs.get(list_attr, []))
    return out


def _plain(value):
    """h5py attribute values as Python values: str for strings, lists of str, int/float scalars."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


# ---------------------------------------------------------------------------- checkpoints

def write_checkpoint(run_dir: Path, round_: int, config_toml: str, config_hash: str,
                     arrays: dict[str, np.ndarray]) -> None:
    """arrays: path inside the file (e.g. "clients/state", "server/pool") -> array."""
    def fill(f):
        f.attrs.update({"schema_version": SCHEMA_VERSION, "kind": "pfedmoap-checkpoint",
                        "config": config_toml, "config_hash": config_hash, "round": round_,
                        "package_version": __version__})
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    _atomic_write(Path(run_dir) / CHECKPOINT, fill)


def read_checkpoint(run_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(attributes, {path: array}); a corrupt, truncated, foreign or older file is one clear error."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise PFedMoAPError(f"{run_dir}: no {CHECKPOINT} to resume from")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            if attrs.get("kind") != "pfedmoap-checkpoint":
                raise PFedMoAPError(f"{path}: not a pfedmoap checkpoint")
            if attrs.get("schema_version") != SCHEMA_VERSION:
                raise PFedMoAPError(f"{path}: checkpoint schema version {attrs.get('schema_version')}, "
                                    f"this pfedmoap reads version {SCHEMA_VERSION}; finish that run with the "
                                    f"pfedmoap version that wrote it ({attrs.get('package_version', '?')})")
            arrays = {}
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
    except (OSError, KeyError, ValueError) as e:
        raise PFedMoAPError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from None
    return attrs, arrays


def has_run(run_dir: Path) -> bool:
    return (Path(run_dir) / RESULTS).exists() or (Path(run_dir) / CHECKPOINT).exists()


IF_EXISTS = ("refuse", "resume", "overwrite")
LOCK = ".pfedmoap.lock"


class RunLock:
    """An exclusive lock on a run directory, held by rank 0 for the whole run.

    flock(2) on a file inside the directory: the kernel releases it when the process ends, however
    it ends (SIGKILL included), so a stale lock never blocks a later run. The file names the holder
    (host, pid) for the error message. On file systems without flock support (some NFS mounts)
    locking fails with one clear line rather than silently allowing two writers."""

    def __init__(self, run_dir: Path):
        import fcntl
        import socket
        self.path = Path(run_dir) / LOCK
        try:
            self.fh = open(self.path, "a+")
        except OSError as e:
            raise PFedMoAPError(f"--out {run_dir}: cannot create {LOCK} ({e.strerror})") from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise PFedMoAPError(f"--out {run_dir}: another run ({holder}) is writing to this directory; "
                                f"wait for it or choose another --out") from None
        except OSError as e:
            self.fh.close()
            raise PFedMoAPError(f"--out {run_dir}: cannot lock {LOCK} ({e.strerror}); the file system "
                                f"may not support flock") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.fh.flush()

    def release(self) -> None:
        if not self.fh.closed:
            self.fh.close()          # closing drops the flock; the file stays (harmless)


def open_run(run_dir: Path, if_exists: str, config_hash: str, expected: dict[str, tuple[int, ...]]
             ) -> tuple[int, dict[str, np.ndarray] | None, RunLock]:
    """The run-directory policy (rank 0): (rounds already done, checkpoint arrays or None, the lock).

    The directory is locked first (RunLock; release it when the run ends): a second run into it
    is refused. Then refuse: a directory that holds a run is an error; overwrite: its results and
    checkpoint go; resume: its checkpoint must come from the same configuration and hold arrays of
    the `expected` shapes (path -> shape), else one clear error before anything is computed."""
    run_dir = Path(run_dir)
    if if_exists not in IF_EXISTS:
        raise PFedMoAPError(f"--if-exists {if_exists!r}: expected one of {', '.join(IF_EXISTS)}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PFedMoAPError(f"--out {run_dir}: cannot create the directory ({e.strerror})") from None
    lock = RunLock(run_dir)
    try:
        start, ckpt = _policy(run_dir, if_exists, config_hash, expected)
    except BaseException:
        lock.release()
        raise
    return start, ckpt, lock


def _policy(run_dir: Path, if_exists: str, config_hash: str, expected: dict) -> tuple[int, dict | None]:
    start, ckpt = 0, None
    if has_run(run_dir):
        if if_exists == "refuse":
            raise PFedMoAPError(f"--out {run_dir}: already holds a run; pass --if-exists resume or "
                                f"overwrite, or choose another directory")
        if if_exists == "overwrite":
            for name in (RESULTS, CHECKPOINT):
                (run_dir / name).unlink(missing_ok=True)
        elif (run_dir / CHECKPOINT).exists():
            attrs, arrays = read_checkpoint(run_dir)
            file = run_dir / CHECKPOINT
            if attrs["config_hash"] != config_hash:
                raise PFedMoAPError(f"{file}: written by a different configuration (config hash "
                                    f"{attrs['config_hash']} != {config_hash}); refusing to resume")
            for key, shape in expected.items():
                got = arrays.get(key)
                if got is None or got.shape != tuple(shape):
                    raise PFedMoAPError(f"{file}: {key} has shape {None if got is None else got.shape}, "
                                        f"this run expects {tuple(shape)} (a checkpoint of another run?)")
            start, ckpt = int(attrs["round"]), arrays
    return start, ckpt
