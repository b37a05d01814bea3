"""HDF5 run files: `results.h5` (every round) and `checkpoint.h5` (to resume). Layout: docs/hdf5-layout.md.

Rank 0 is the only writer. Both files are written whole to a temporary file, flushed, synced and
renamed over the old one: a job killed at any moment leaves the previous file intact.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import PFedMoAPError

SCHEMA_VERSION = 1
RESULTS, CHECKPOINT = "results.h5", "checkpoint.h5"

# per round x client arrays and their fill values
ROUND_FIELDS = {"accuracy": np.float32, "macro_f1": np.float32, "loss": np.float32,
                "participated": np.bool_, "experts": np.int32, "gate_weight": np.float32,
                "domain_accuracy": np.float32,
                "bytes_up": np.int64, "bytes_down": np.int64, "phase_time": np.float32,
                "wall_time": np.float32}


def library_versions() -> str:
    return f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"


def _atomic_write(path: Path, fill) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        fill(f)
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Results:
    """The results log held by rank 0 and rewritten atomically after every round."""

    def __init__(self, run_dir: Path, attrs: dict, partition: dict, phases: list[str]):
        self.path = Path(run_dir) / RESULTS
        self.attrs = {"schema_version": SCHEMA_VERSION, "package_version": __version__,
                      "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "rounds_done": 0, "status": "running", **attrs}
        self.partition = partition
        self.phases = phases
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in ROUND_FIELDS}

    def append(self, row: dict) -> None:
        for k in ROUND_FIELDS:
            self.rows[k].append(np.asarray(row[k], ROUND_FIELDS[k]))
        self.attrs["rounds_done"] = len(self.rows["accuracy"])

    def truncate(self, n_rounds: int) -> None:
        for k in self.rows:
            del self.rows[k][n_rounds:]
        self.attrs["rounds_done"] = n_rounds

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
            for k, rows in self.rows.items():
                if rows:
                    r.create_dataset(k, data=np.stack(_pad_ranks(rows) if k == "phase_time" else rows))
            if "phase_time" in r:
                r["phase_time"].attrs["phases"] = self.phases
        _atomic_write(self.path, fill)

    @classmethod
    def reopen(cls, run_dir: Path, n_rounds: int) -> "Results":
        """The log of a run being resumed, cut back to its first `n_rounds` rounds."""
        data = read_results(run_dir)
        res = cls.__new__(cls)
        res.path = Path(run_dir) / RESULTS
        res.attrs = dict(data["attrs"])
        res.partition = dict(data["partition"])
        res.phases = list(data["rounds"].pop("phases", []))
        res.rows = {k: list(data["rounds"].get(k, np.empty((0,))))[:n_rounds] for k in ROUND_FIELDS}
        if len(res.rows["accuracy"]) < n_rounds:
            raise PFedMoAPError(f"{res.path}: holds {len(res.rows['accuracy'])} rounds but the checkpoint "
                                f"{n_rounds}; the run directory is inconsistent")
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
            if "schema_version" in attrs and attrs["schema_version"] != SCHEMA_VERSION:
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
    def fill(f):
        f.attrs.update({"schema_version": SCHEMA_VERSION, "kind": "pfedmoap-checkpoint",
                        "config": config_toml, "config_hash": config_hash, "round": round_,
                        "package_version": __version__})
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    _atomic_write(Path(run_dir) / CHECKPOINT, fill)


def read_checkpoint(run_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(attributes, arrays); a corrupt, truncated or foreign file is one clear error."""
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
                                    f"this pfedmoap reads version {SCHEMA_VERSION}")
            arrays = {k: f[k][()] for k in f}
    except (OSError, KeyError, ValueError) as e:
        raise PFedMoAPError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from None
    return attrs, arrays


def has_run(run_dir: Path) -> bool:
    return (Path(run_dir) / RESULTS).exists() or (Path(run_dir) / CHECKPOINT).exists()
