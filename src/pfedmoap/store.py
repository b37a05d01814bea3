"""HDF5 run files: `results.h5` (every round) and `checkpoint.h5` (to resume). Layout: docs/hdf5-layout.md.

Rank 0 is the only writer. A checkpoint is written whole to a temporary file, flushed, synced and
renamed over the old one: a job killed at any moment leaves the previous file intact. results.h5 is
created that way and then appended in place, one reserved row per round, committed by its
`rounds_done` attribute (`Results`): a job killed at any moment leaves a file that opens with every
round it reported complete.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import PFedMoAPError

SCHEMA_VERSION = 2          # checkpoints; 2: groups /clients and /server
# results.h5: 1 and 2 hold the same round fields (2 adds method-declared logs); 3 (RESULTS_SCHEMA)
# reserves the rows of every planned round (rows past rounds_done are not rounds) and adds /rounds/evaluated
READABLE_RESULTS = (1, 2, 3)
RESULTS, CHECKPOINT = "results.h5", "checkpoint.h5"


@dataclass(frozen=True)
class Field:
    dtype: type
    units: str
    description: str
    shape: tuple[int, ...] = ()         # per client, after the client axis (method logs)


# The round fields every method has; a method adds its own (algorithms.base.Log).
ROUND_FIELDS = {
    "accuracy": Field(np.float32, "fraction", "top-1 accuracy on the client's own test split"),
    "macro_f1": Field(np.float32, "fraction", "macro-F1 on the client's own test split"),
    "loss": Field(np.float32, "nats", "mean cross-entropy on the client's own test split"),
    "participated": Field(np.bool_, "bool", "the client trained in this round (1) or not (0)"),
    "dropped": Field(np.bool_, "bool", "the client trained in this round but its upload did not arrive "
                     "(train.drop_rate; 0 everywhere in files before it)"),
    "evaluated": Field(np.bool_, "bool", "the client was evaluated this round (1); where 0 its accuracy, "
                       "macro_f1, loss, domain_accuracy and client-side logs are NaN (run.eval_every, "
                       "run.eval_clients)"),
    "domain_accuracy": Field(np.float32, "fraction", "accuracy per domain of the client's test split; "
                             "NaN where it has no image of that domain"),
    "bytes_up": Field(np.int64, "bytes", "payload bytes the client sent this round"),
    "bytes_down": Field(np.int64, "bytes", "payload bytes the client received this round"),
    "phase_time": Field(np.float32, "seconds", "wall seconds per rank and phase (attr phases)"),
    "wall_time": Field(np.float32, "seconds", "wall seconds of the whole round"),
    "dp_epsilon": Field(np.float64, "epsilon", "client-level (epsilon, dp_delta)-DP spent by the end of the "
                        "round (RDP accountant, dp.py); inf with clipping but no noise; NaN with DP off"),
}

# /partition's data sets (docs/hdf5-layout.md): (units, description), written as their attributes.
PARTITION_FIELDS = {
    "train_client": ("client id", "client owning each training image, -1 if none"),
    "test_client": ("client id", "client owning each test image, -1 if none"),
    "class_counts": ("images", "training images per client and class"),
    "test_class_counts": ("images", "test images per client and class"),
    "n_train": ("images", "training-set size per client"),
    "test_domain_counts": ("images", "test images per client and domain (attr domain_names)"),
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
    evaluated: np.ndarray | None = None  # (N,) bool; None: every client
    dropped: np.ndarray | None = None    # (N,) bool; None: no upload lost


def library_versions() -> str:
    return f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"


def discard(f: h5py.File) -> None:
    """Close an HDF5 file whose writes failed (a full disk, a quota, a read-only file system), with
    every object open in it, and raise nothing. Closed as usual, HDF5 would write its pending
    metadata, fail again half way and leave objects open whose later release prints "Exception
    ignored" tracebacks and can crash the process (SIGSEGV at exit). So the file's descriptor is
    first pointed at an anonymous memory file: those last writes succeed there and are dropped with
    it, and the file on disk keeps what was written before the failure (for results.h5: every
    committed round)."""
    try:
        if f.id.valid and f.driver == "sec2":
            fd = f.id.get_vfd_handle()
            scratch = os.memfd_create("pfedmoap-discard") if hasattr(os, "memfd_create") \
                else os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(scratch, fd)
            finally:
                os.close(scratch)
    except Exception:  # noqa: BLE001 - best effort; the close below still runs
        pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the file is already in error
        _end_without_hdf5_cleanup()


def _end_without_hdf5_cleanup() -> None:
    """A write that failed inside HDF5 itself (a flush half done, a data set half created on a full
    disk) can leave the library with objects it can neither close nor free: its own clean-up at the
    process's exit then crashes (SIGSEGV). Such a process ends instead, once Python's exit handlers
    ran, with exit status 2 (the status of the error line it printed) and no HDF5 clean-up."""
    import atexit
    import sys

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        mpi = sys.modules.get("mpi4py.MPI")
        try:            # under MPI: end every rank at once, as any other error does
            if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.size > 1:
                mpi.COMM_WORLD.Abort(2)
        except Exception:  # noqa: BLE001
            pass
        os._exit(2)
    if not getattr(_end_without_hdf5_cleanup, "armed", False):
        _end_without_hdf5_cleanup.armed = True
        atexit.register(end)          # the first registered runs last: after every other handler


@contextlib.contextmanager
def quiet_release() -> Iterator[None]:
    """While HDF5 writes may fail: an h5py object released while its file cannot be written (h5py
    creates and drops some inside a failing call) cannot close and prints an "Exception ignored"
    traceback; the failure itself is raised (and reported) anyway, so those are dropped here, and
    the objects left open are closed by `discard`. Other unraisable errors are reported as usual."""
    import sys
    import traceback
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def from_h5py(tb) -> bool:
        return any("h5py" in frame.filename for frame in traceback.extract_tb(tb))

    def quiet_unraisable(info):
        if not ("h5py" in repr(info.object) or from_h5py(info.exc_traceback)):
            unraisable(info)

    def quiet_excepthook(kind, value, tb):   # Cython prints a __dealloc__'s traceback through it
        if not from_h5py(tb):
            excepthook(kind, value, tb)
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = unraisable, excepthook


@contextlib.contextmanager
def new_h5(path: Path) -> Iterator[h5py.File]:
    """`with new_h5(path) as f:` a new HDF5 file, flushed and closed at the end of the block. If
    anything fails in the block or at the close (a write to a full disk, ...) the file is closed
    with `discard` and the error goes on: no HDF5 object outlives the failure, nothing is printed."""
    with quiet_release():
        f = h5py.File(path, "w")
        try:
            yield f
            f.flush()
            f.close()
        except BaseException:
            discard(f)
            raise


def is_write_failure(err: BaseException) -> bool:
    """h5py reports a failed write as OSError, RuntimeError (flush, close) or ValueError (creating a
    data set whose fill is written at once); the last only counts when HDF5 names an errno."""
    return isinstance(err, (OSError, RuntimeError)) or (isinstance(err, ValueError)
                                                        and _HDF5_ERRNO.search(str(err)) is not None)


_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def write_failure(err: BaseException) -> str:
    """Why a write failed, in words: the errno's text (h5py's errors carry it inside HDF5's message,
    e.g. 'No space left on device'), else the error's first line."""
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    found = _HDF5_ERRNO.search(str(err))
    if found:
        return os.strerror(int(found.group(1)))
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _atomic_write(path: Path, fill) -> None:
    """Write `path` whole through a temporary file, fsync, rename: a job killed at any moment
    leaves the previous file intact. A write that fails (a full disk, a quota, a read-only file
    system) closes every HDF5 object (`new_h5`), removes the temporary file and is one clear error;
    the previous file stays."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with new_h5(tmp) as f:
            fill(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:
        if not is_write_failure(e):
            tmp.unlink(missing_ok=True)
            raise
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


def _failed_write(path: Path, tmp: Path | None, err: BaseException) -> None:
    try:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass
    raise PFedMoAPError(f"{path}: could not be written ({write_failure(err)}); the previous version, if any, is "
                        f"intact (full disk or quota? free space, then resume)") from None


# ---------------------------------------------------------------------------- results.h5, appended in place

RESULTS_SCHEMA = 3          # 3: rows appended in place (preallocated, `rounds_done` commits), /rounds/evaluated
CHUNK_BYTES = 64 * 1024     # target size of a chunk of round rows (one row at least)


def _row_chunks(n_rounds: int, row_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    rows = max(1, min(n_rounds, CHUNK_BYTES // max(1, itemsize * int(np.prod(row_shape, dtype=np.int64)))))
    return (rows, *row_shape)


def row_fill(dtype) -> object:
    """What a reserved row holds until its round is written (docs/hdf5-layout.md): NaN for floats,
    -1 for integers (no count, no client id), False for booleans (not participated, not evaluated)."""
    kind = np.dtype(dtype).kind
    return np.nan if kind in "fc" else (False if kind == "b" else -1)


def _create_rounds_dataset(group: h5py.Group, name: str, n_rounds: int, row_shape: tuple[int, ...],
                           dtype, info: Field | None, fill_from: int = 0) -> h5py.Dataset:
    """(n_rounds, *row_shape), resizable on the round axis, every chunk allocated now
    (H5D_ALLOC_TIME_EARLY) and rows `fill_from..` written with the fill (`row_fill`, also the data
    set's declared fillvalue): a round's row is later written in place, no write after the file's
    creation allocates space or touches the chunk index, and a row not written yet reads as NaN
    (-1, False), never as a fake 0. The fill is written by plain writes, not by HDF5 at creation
    (H5D_FILL_TIME_NEVER): a creation that fails on a full disk leaves HDF5 a half-made data set
    that crashes the process at exit; a failed write is a clean error."""
    dtype = np.dtype(dtype)
    fill = row_fill(dtype)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_fill_value(np.array(fill, dtype))
    chunks = _row_chunks(n_rounds, row_shape, dtype.itemsize)
    ds = group.create_dataset(name, shape=(n_rounds, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                              chunks=chunks, dcpl=dcpl, track_times=False)
    step = chunks[0] * max(1, (16 << 20) // max(1, CHUNK_BYTES))       # whole chunks, about 16 MiB a write
    for a in range(fill_from, n_rounds, step):
        b = min(n_rounds, a + step)
        ds[a:b] = np.full((b - a, *row_shape), fill, dtype)
    if info is not None:
        ds.attrs["units"] = info.units
        ds.attrs["description"] = info.description
    return ds


class Results:
    """results.h5 of a run, held open by rank 0 and appended in place (docs/hdf5-layout.md).

    The file is created whole (temporary file, fsync, rename) with every round's row reserved:
    each /rounds data set has n_rounds rows, chunked, every chunk allocated at creation and left
    unwritten. A round is then written into its reserved row, flushed and fsync'ed, and only then is
    the root attribute `rounds_done` rewritten in place: after creation nothing allocates file space
    or changes the file's structure, so a process killed at any moment leaves a file that opens,
    with every round up to `rounds_done` complete (rows past it are not rounds yet). A stopped run's
    file is cut to its rounds (rewritten atomically) when it closes; a resumed run's file is rewritten
    from the rounds its checkpoint covers (`reopen`). Memory and time per round do not grow with the
    rounds already written. A committed row never changes: the time rank 0 spends after a round's
    commit (the commit itself, a checkpoint) is counted in the next round's `write` phase and wall
    time; after the last round, in the root attribute `final_write_time`.

    `logs` declares the method's own per-client logs: name -> Field (dtype, units, description, shape)."""

    def __init__(self, run_dir: Path, attrs: dict, partition: dict, phases: list[str],
                 logs: dict[str, Field] | None = None):
        self.path = Path(run_dir) / RESULTS
        self.attrs = {"schema_version": RESULTS_SCHEMA, "package_version": __version__,
                      "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "rounds_done": 0, "status": "running", "final_write_time": float("nan"), **attrs}
        self.partition = partition
        self.phases = list(phases)
        self.log_fields = dict(logs or {})
        self.mean_accuracy: list[float] = []        # per round written, over the evaluated clients
        self.last: RoundRecord | None = None        # the latest round
        self._pending: list[RoundRecord] = []       # appended, not yet in the file
        self._written = 0                           # rows in the file
        self._carry = 0.0                           # seconds spent after the last commit
        self._file: h5py.File | None = None

    # -------------------------------------------------------------- the rounds
    @property
    def rounds_done(self) -> int:
        return int(self.attrs["rounds_done"])

    def append(self, record: RoundRecord) -> None:
        """The next round; it is in the file after the next `write`."""
        if set(record.logs) != set(self.log_fields):
            raise ValueError(f"round logs {sorted(record.logs)} != declared {sorted(self.log_fields)}")
        if record.evaluated is None:
            record.evaluated = np.ones(len(record.accuracy), bool)
        if record.dropped is None:
            record.dropped = np.zeros(len(record.accuracy), bool)
        if self._carry:            # the previous round's commit and checkpoint
            record.phase_time[0, self.phases.index("write")] += self._carry
            record.wall_time += self._carry
            self._carry = 0.0
        self._pending.append(record)
        self.last = record
        self.mean_accuracy.append(_quiet_nanmean(record.accuracy))
        self.attrs["rounds_done"] = self._written + len(self._pending)

    def add_time(self, seconds: float, phase: str = "write") -> None:
        """Time rank 0 spent writing: added to the round not committed yet (the one appended last),
        or, after a commit, carried into the next round appended (its `write` phase and wall time);
        after the last round, `final_write_time` when the file closes."""
        if self._pending:
            rec = self._pending[-1]
            rec.phase_time[0, self.phases.index(phase)] += seconds
            rec.wall_time += seconds
        else:
            self._carry += seconds

    def write(self, status: str | None = None) -> None:
        """Every appended round into its reserved row, flushed and synced, then `rounds_done` (and
        `status`) rewritten in place and flushed: the commit."""
        if status:
            self.attrs["status"] = status
        if self._file is None:
            self.create()
        f = self._file
        with quiet_release():
            self._commit(f)

    def _commit(self, f: h5py.File) -> None:
        try:
            for rec in self._pending:
                self._write_row(self._written, rec)
                self._written += 1
            self._pending.clear()
            f.flush()
            os.fsync(f.id.get_vfd_handle())     # the rows are on disk before rounds_done says so
            if self._committed != self._written:
                f.attrs.modify("rounds_done", np.int64(self._written))     # in place: the commit
                self._committed = self._written
            if self._status != self.attrs["status"]:
                f.attrs.modify("status", self.attrs["status"])
                self._status = self.attrs["status"]
            f.flush()
        except (OSError, RuntimeError, ValueError) as e:
            if not is_write_failure(e):
                raise
            self._abandon()
            _failed_write(self.path, None, e)

    def last_value(self, name: str) -> np.ndarray | None:
        """A round field of the latest round (from memory, or from the file of a resumed run)."""
        if self.last is not None:
            return np.asarray(getattr(self.last, name))
        if self.rounds_done == 0:
            return None
        with h5py.File(self.path, "r", locking=False) as f:
            return f["rounds"][name][self.rounds_done - 1]

    def close(self) -> None:
        """Close the file; a run that stopped before its last round has its reserved rows cut
        (the file rewritten atomically), so that every row of a finished file is a round."""
        if self._file is None:
            return
        try:
            with quiet_release():
                if self._carry and self.attrs["status"] in FINISHED and not self._pending:
                    self.attrs["final_write_time"] = self._carry
                    self._file.attrs.modify("final_write_time", np.float64(self._carry))
                    self._carry = 0.0
                self._rows = {}
                self._file.close()
        except (OSError, RuntimeError) as e:
            self._abandon()
            _failed_write(self.path, None, e)
        self._file = None
        n = self.rounds_done
        if self.attrs["status"] == "stopped" and n < int(self.attrs["n_rounds"]):
            _rewrite_results(self.path, n, self.phases, int(self.attrs["world_size"]), dict(self.attrs))

    def _abandon(self) -> None:
        """After a failed write: close the file and its data sets (`discard`); what was committed stays."""
        discard(self._file)
        self._file, self._rows = None, {}

    # -------------------------------------------------------------- the file
    def _shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Row shape and dtype of every /rounds data set."""
        N = int(self.attrs["n_clients"])
        n_dom = max(1, len(self.partition.get("domain_names", ())) or 1)
        W = int(self.attrs["world_size"])
        shapes = {k: ((N,), f.dtype) for k, f in ROUND_FIELDS.items()}
        shapes["domain_accuracy"] = ((N, n_dom), np.float32)
        shapes["phase_time"] = ((W, len(self.phases)), np.float32)
        shapes["wall_time"] = ((), np.float32)
        shapes["dp_epsilon"] = ((), np.float64)
        for k, f in self.log_fields.items():
            shapes[k] = ((N, *f.shape), f.dtype)
        return shapes

    def create(self) -> None:
        """A new results.h5 with every round's row reserved, then held open for the rounds."""
        shapes, n_rounds = self._shapes(), int(self.attrs["n_rounds"])
        info = {**ROUND_FIELDS, **self.log_fields}

        def fill(f):
            _write_attrs(f, self.attrs)
            g = f.create_group("partition")
            for k, v in self.partition.items():
                if k in ("classnames", "domain_names"):
                    g.attrs[k] = list(v)
                else:
                    g.create_dataset(k, data=v)
                    if k in PARTITION_FIELDS:
                        g[k].attrs["units"], g[k].attrs["description"] = PARTITION_FIELDS[k]
            r = f.create_group("rounds")
            for k, (shape, dtype) in shapes.items():
                _create_rounds_dataset(r, k, n_rounds, shape, dtype, info[k])
            r["phase_time"].attrs["phases"] = self.phases
        _atomic_write(self.path, fill)
        self._open()

    def _open(self) -> None:
        try:
            self._file = h5py.File(self.path, "r+", locking=False)   # the run lock keeps other writers out
        except OSError as e:
            _failed_write(self.path, None, e)
        self._written = self._committed = int(self._file.attrs["rounds_done"])
        self._status = _plain(self._file.attrs["status"])
        self._rows = {k: self._file["rounds"][k] for k in self._file["rounds"]}

    def _write_row(self, i: int, rec: RoundRecord) -> None:
        for k, f in ROUND_FIELDS.items():
            if k == "phase_time":                 # padded with NaN to the ranks the file has room for
                row = np.full(self._rows[k].shape[1:], np.nan, np.float32)
                pt = np.asarray(rec.phase_time, np.float32)
                row[:pt.shape[0], :pt.shape[1]] = pt
                self._rows[k][i] = row
            else:
                self._rows[k][i] = np.asarray(getattr(rec, k), f.dtype)
        for k, f in self.log_fields.items():
            self._rows[k][i] = np.asarray(rec.logs[k], f.dtype)

    @classmethod
    def reopen(cls, run_dir: Path, n_rounds: int, logs: dict[str, Field] | None = None,
               phases: list[str] | None = None, world_size: int | None = None) -> "Results":
        """The log of a run being resumed: the file rewritten (atomically) with its first `n_rounds`
        rounds, per-rank timings widened to `world_size` ranks and mapped onto `phases`; then held
        open for the next rounds."""
        path = Path(run_dir) / RESULTS
        data = read_results(run_dir, rounds=False)
        attrs = dict(data["attrs"])
        have = int(attrs.get("rounds_done", 0))
        if have < n_rounds:
            raise PFedMoAPError(f"{path}: holds {have} rounds but the checkpoint {n_rounds}; "
                                f"the run directory is inconsistent")
        res = cls(run_dir, {}, dict(data["partition"]), [], logs)
        res.phases = list(phases if phases is not None else data["phases"])
        if n_rounds == have == int(attrs.get("n_rounds", -1)) and attrs.get("status") == "complete":
            res.attrs = attrs                       # nothing left to run: the file stays as it is
            res.mean_accuracy = _mean_accuracy(path, n_rounds)
            return res
        world = max(int(attrs.get("world_size", 1)), int(world_size or 1))
        attrs.update(rounds_done=n_rounds, status="running", world_size=world_size or world,
                     schema_version=RESULTS_SCHEMA, package_version=__version__, final_write_time=float("nan"))
        res.attrs = attrs
        res.mean_accuracy = _rewrite_results(path, n_rounds, res.phases, world, attrs, res.log_fields)
        res._open()
        return res


def _write_attrs(f: h5py.File, attrs: dict) -> None:
    for k, v in attrs.items():
        if k == "rounds_done":                    # rewritten in place each round: a fixed-size int
            f.attrs.create(k, np.int64(v))
        elif k == "final_write_time":
            f.attrs.create(k, np.float64(v))
        else:
            f.attrs[k] = v


def _rewrite_results(path: Path, n: int, phases: list[str], world: int, attrs: dict,
                     logs: dict[str, Field] | None = None) -> list[float]:
    """Rewrite results.h5 (temporary file, fsync, rename) with its first n rounds, the round axis
    still reserved to n_rounds rows (a running or resumed run) or cut to n (a stopped one:
    attrs status "stopped"); per-rank timings widened to `world` ranks and mapped by name onto
    `phases` (NaN where a phase or rank was not timed). Rows are copied a block at a time. Returns
    the mean accuracy of each round kept."""
    reserve = n if attrs.get("status") == "stopped" else max(n, int(attrs["n_rounds"]))
    means: list[float] = []
    try:
        src = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise PFedMoAPError(f"{path}: unreadable HDF5 ({str(e).splitlines()[0]}); {_EXPECTED}") from None
    info = {**ROUND_FIELDS, **(logs or {})}
    with src:
        rounds = src["rounds"] if "rounds" in src else {}
        old_phases = _plain(rounds["phase_time"].attrs.get("phases", [])) if "phase_time" in rounds else []

        def fill(f):
            _write_attrs(f, attrs)
            src.copy(src["partition"], f, "partition")
            g = f.create_group("rounds")
            N = int(attrs["n_clients"])
            names = list(dict.fromkeys([*ROUND_FIELDS, *(logs or {}), *rounds]))
            for k in names:
                old = rounds.get(k)
                if isinstance(old, h5py.Dataset) and old.ndim == 0:
                    old = None
                if k == "phase_time":
                    shape, dtype = (world, len(phases)), np.float32
                elif old is not None:
                    shape, dtype = old.shape[1:], old.dtype
                elif k in ("wall_time", "dp_epsilon"):
                    shape, dtype = (), ROUND_FIELDS[k].dtype
                else:                                  # a field this file's schema did not have
                    shape, dtype = (N, *info[k].shape), np.dtype(info[k].dtype)
                field_info = info.get(k) or (Field(dtype, _plain(old.attrs.get("units", "")),
                                                   _plain(old.attrs.get("description", "")))
                                             if old is not None else None)
                ds = _create_rounds_dataset(g, k, reserve, shape, dtype, field_info, fill_from=n)
                row_bytes = max(1, np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)))
                step = max(1, (64 << 20) // row_bytes)
                for a in range(0, n, step):
                    b = min(n, a + step)
                    if old is None:                    # evaluated: every client, before schema 3
                        block = np.full((b - a, *shape), True if k == "evaluated" else row_fill(dtype), dtype)
                    elif k == "phase_time":
                        block = np.full((b - a, *shape), np.nan, np.float32)
                        got = old[a:b]
                        for j, p in enumerate(phases):
                            if p in old_phases:
                                w = min(world, got.shape[1])
                                block[:, :w, j] = got[:, :w, old_phases.index(p)]
                    else:
                        block = old[a:b]
                    ds[a:b] = block
                    if k == "accuracy":
                        means.extend(_quiet_nanmean(row) for row in block)
            g["phase_time"].attrs["phases"] = list(phases)
        _atomic_write(path, fill)
    return means


FINISHED = ("complete", "stopped")


def follow(path: str | Path, poll: float = 0.5, sleep=None):
    """Each round of a run as it is committed to its results.h5, read while the run writes it:
    yields dicts (round, 0-based; n_rounds, n_clients, accuracy (N,), participants, evaluated,
    wall_time, status) in round order, each round once, and returns when the run's status is
    complete or stopped and every round has been yielded. Waits for the file to appear. The file is
    opened afresh at each poll (no HDF5 locking) and only rows not yielded yet are read; a resumed
    run's file, cut back to its checkpoint, is followed from the first round not yielded yet.

    A run whose writer is gone (killed, or failed) while its file still says `running` is one
    PFedMoAPError: nobody holds the run-directory lock (`writer_alive`) at two polls in a row,
    each time before a read that found no new round and no final status."""
    import time
    sleep = sleep or time.sleep
    path = Path(path)
    file = path / RESULTS if path.is_dir() or path.suffix != ".h5" else path
    nxt, failures, gone = 0, 0, 0
    while True:
        alive = writer_alive(file.parent)        # before the read: a writer writes its status, then lets go
        try:
            rows, attrs = _rows_since(file, nxt) if file.is_file() else ([], None)
            failures = 0
        except (OSError, KeyError) as e:      # caught at the moment of a rename: try again
            failures += 1
            if failures > 20:
                raise PFedMoAPError(f"{file}: unreadable HDF5 ({str(e).splitlines()[0]}); {_EXPECTED}") from None
            rows, attrs = [], None
        for row in rows:
            yield row
            nxt = row["round"] + 1
        if attrs is not None and attrs["status"] in FINISHED and nxt >= attrs["rounds_done"]:
            return
        gone = gone + 1 if attrs is not None and not alive and not rows else 0
        if gone >= 2:
            raise PFedMoAPError(f"{file}: no process is writing this run any more (status {attrs['status']!r} "
                                f"at {attrs['rounds_done']} of {attrs['n_rounds']} rounds, and nobody holds "
                                f"{file.parent / LOCK}): it was killed or failed; resume with: pfedmoap resume "
                                f"{file.parent}")
        sleep(poll)


def _rows_since(file: Path, start: int) -> tuple[list[dict], dict]:
    with h5py.File(file, "r", locking=False) as f:
        attrs = {k: _plain(f.attrs[k]) for k in ("rounds_done", "status", "n_rounds", "n_clients")}
        done = int(attrs["rounds_done"])
        if done <= start:
            return [], attrs
        r = f["rounds"]
        acc = r["accuracy"][start:done]
        part = r["participated"][start:done]
        ev = r["evaluated"][start:done] if "evaluated" in r else np.ones(acc.shape, bool)
        wall = r["wall_time"][start:done] if "wall_time" in r else np.full(len(acc), np.nan)
    return [{"round": start + i, "n_rounds": int(attrs["n_rounds"]), "n_clients": int(attrs["n_clients"]),
             "accuracy": acc[i], "participants": int(part[i].sum()), "evaluated": int(ev[i].sum()),
             "wall_time": float(wall[i]), "status": attrs["status"]} for i in range(len(acc))], attrs


def _mean_accuracy(path: Path, n: int) -> list[float]:
    with h5py.File(path, "r", locking=False) as f:
        acc = f["rounds/accuracy"]
        step = max(1, (64 << 20) // max(1, acc.dtype.itemsize * int(np.prod(acc.shape[1:]))))
        return [_quiet_nanmean(row) for a in range(0, n, step) for row in acc[a:min(n, a + step)]]


def round_line(round_: int, rounds: int, accuracy: np.ndarray, participants: int, evaluated: int,
               n_clients: int, seconds: float, digits: int = 1) -> str:
    """The one line per round of the console and of `pfedmoap report --follow`."""
    acc = f"{100 * _quiet_nanmean(accuracy):.2f}%" if evaluated else "- (no client evaluated)"
    ev = "" if evaluated == n_clients else f"  evaluated {evaluated}/{n_clients}"
    return (f"round {round_ + 1}/{rounds}  mean accuracy {acc}  participants {participants}/{n_clients}{ev}  "
            f"{seconds:.{digits}f}s")


def _quiet_nanmean(values) -> float:
    """np.nanmean (in the array's own precision, as the console line), NaN for no value at all."""
    a = np.asarray(values)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


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


def read_results(path: str | Path, rounds: bool = True) -> dict:
    """Everything in a results.h5 as plain Python and numpy:
    `{"attrs": {...}, "partition": {name: ndarray, "classnames": [str]},
    "rounds": {name: ndarray, "phases": [str]}, "phases": [str]}` (`rounds=False`: no round rows).

    Root attributes are checked only for the schema this package writes; a file of another
    schema_version is returned as found so the caller can report it. Opens without HDF5 file locking
    so that a run still being written can be read; the round rows are cut to `rounds_done` (rows past
    it are reserved for rounds not committed yet)."""
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
            done = attrs.get("rounds_done")
            rows = done if isinstance(done, int) and not isinstance(done, bool) and done >= 0 else None
            phases = _plain(h5["rounds/phase_time"].attrs.get("phases", [])) \
                if isinstance(h5.get("rounds/phase_time"), h5py.Dataset) else []
            data = _read_group(h5, "rounds", None, rows) if rounds else {}
            if "phase_time" in data:
                data["phases"] = phases
    except OSError as err:
        raise PFedMoAPError(f"{file}: unreadable HDF5 ({str(err).splitlines()[0]}); "
                            f"{_EXPECTED}") from err
    return {"attrs": attrs, "partition": partition, "rounds": data, "phases": phases}


def _read_group(h5: h5py.File, name: str, list_attr: str | None, rows: int | None = None) -> dict:
    """The group's data sets (those with a round axis cut to `rows` rows when given)."""
    group = h5.get(name)
    if not isinstance(group, h5py.Group):
        return {}
    out = {key: (item[:rows] if rows is not None and item.ndim >= 1 else item[()])
           for key, item in group.items() if isinstance(item, h5py.Dataset)}
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
                     arrays: dict[str, np.ndarray], streamed: dict[str, tuple[tuple[int, ...], object]] | None = None
                     ) -> None:
    """arrays: path inside the file (e.g. "server/pool") -> array. streamed: path -> (shape, blocks),
    an array written as its row blocks arrive: `blocks` yields (row ids, increasing; rows), so the
    whole array (e.g. "clients/state", gathered from the ranks a block at a time) is never held."""
    def fill(f):
        f.attrs.update({"schema_version": SCHEMA_VERSION, "kind": "pfedmoap-checkpoint",
                        "config": config_toml, "config_hash": config_hash, "round": round_,
                        "package_version": __version__})
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, (shape, blocks) in (streamed or {}).items():
            ds = f.create_dataset(k, shape=shape, dtype=np.float32)
            for ids, rows in blocks:
                _write_rows(ds, np.asarray(ids, np.int64), rows)
    _atomic_write(Path(run_dir) / CHECKPOINT, fill)


def _write_rows(ds: h5py.Dataset, ids: np.ndarray, rows: np.ndarray) -> None:
    """rows[i] into ds[ids[i]], one slice per run of consecutive ids."""
    if not len(ids):
        return
    cuts = np.flatnonzero(np.diff(ids) != 1) + 1
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
        ds[ids[a]:ids[b - 1] + 1] = rows[a:b]


class CheckpointRows:
    """A checkpoint array left in the file (read_checkpoint(lazy=...)): its shape, and rows on demand."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...]):
        self.path, self.name, self.shape = path, name, tuple(shape)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), *self.shape[1:]), np.float32)
        if not len(ids):
            return out
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[self.name]
                for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
                    out[a:b] = ds[ids[a]:ids[b - 1] + 1]
        except (OSError, KeyError, ValueError) as e:
            raise PFedMoAPError(f"{self.path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from None
        return out


def read_checkpoint(run_dir: Path, lazy: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """(attributes, {path: array}); a corrupt, truncated, foreign or older file is one clear error.
    The arrays named in `lazy` stay in the file: CheckpointRows (shape, rows on demand)."""
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
            f.visititems(lambda name, obj: arrays.__setitem__(
                name, CheckpointRows(path, name, obj.shape) if name in lazy else obj[()])
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
            _flock_retrying(self.fh, fcntl.LOCK_EX)
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


def _flock_retrying(fh, kind: int, tries: int = 20, pause: float = 0.025) -> None:
    """flock(kind | LOCK_NB), tried again for half a second: `writer_alive` holds a shared lock
    for a few microseconds, which must not make a new run refuse its directory."""
    import fcntl
    import time
    for i in range(tries):
        try:
            fcntl.flock(fh, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == tries - 1:
                raise
            time.sleep(pause)


def writer_alive(run_dir: Path) -> bool:
    """Whether a process holds the run directory's lock (RunLock), i.e. a run is writing it: the kernel
    drops the lock when its holder ends, however it ends (SIGKILL included). Probed with a shared
    lock taken and dropped at once; where that cannot be told (no lock file support), True."""
    import fcntl
    try:
        fh = open(Path(run_dir) / LOCK, "rb")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:             # BlockingIOError: held by a writer; others: cannot tell
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def open_run(run_dir: Path, if_exists: str, config_hash: str, expected: dict[str, tuple[int, ...]],
             recorded_hash=lambda attrs: attrs["config_hash"], hash_of_toml=None
             ) -> tuple[int, dict[str, np.ndarray] | None, RunLock]:
    """The run-directory policy (rank 0): (rounds already done, checkpoint arrays or None, the lock).

    The directory is locked first (RunLock; release it when the run ends): a second run into it
    is refused. Then refuse: a directory that holds a run is an error; overwrite: its results and
    checkpoint go; resume: its checkpoint, results.h5 and config.toml must all come from this run
    (`config_hash`; `hash_of_toml(text)` gives a config text's run hash) and the checkpoint hold
    arrays of the `expected` shapes (path -> shape) and no more rounds than results.h5, else one
    clear error before anything is computed or any file of the directory rewritten.
    `recorded_hash(attrs)`: the hash a checkpoint's or results.h5's attributes stand for
    (config.recorded_run_hash also accepts the hashes of an earlier scheme)."""
    run_dir = Path(run_dir)
    if if_exists not in IF_EXISTS:
        raise PFedMoAPError(f"--if-exists {if_exists!r}: expected one of {', '.join(IF_EXISTS)}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PFedMoAPError(f"--out {run_dir}: cannot create the directory ({e.strerror})") from None
    lock = RunLock(run_dir)
    try:
        start, ckpt = _policy(run_dir, if_exists, config_hash, expected, recorded_hash, hash_of_toml)
    except BaseException:
        lock.release()
        raise
    return start, ckpt, lock


def _policy(run_dir: Path, if_exists: str, config_hash: str, expected: dict, recorded_hash,
            hash_of_toml=None) -> tuple[int, dict | None]:
    start, ckpt = 0, None
    if has_run(run_dir):
        if if_exists == "refuse":
            raise PFedMoAPError(f"--out {run_dir}: already holds a run; pass --if-exists resume or "
                                f"overwrite, or choose another directory")
        if if_exists == "overwrite":
            for name in (RESULTS, CHECKPOINT):
                (run_dir / name).unlink(missing_ok=True)
        else:
            if (run_dir / CHECKPOINT).exists():
                start, ckpt = _resumable(run_dir, config_hash, expected, recorded_hash)
            _same_run(run_dir, config_hash, start, expected, recorded_hash, hash_of_toml)
    return start, ckpt


def _resumable(run_dir: Path, config_hash: str, expected: dict, recorded_hash) -> tuple[int, dict]:
    """(round, arrays) of the run directory's checkpoint, if it is this configuration's."""
    attrs, arrays = read_checkpoint(run_dir, lazy=("clients/state",))
    file = run_dir / CHECKPOINT
    if recorded_hash(attrs) != config_hash:
        raise PFedMoAPError(f"{file}: written by a different configuration (config hash "
                            f"{attrs['config_hash']} != {config_hash}); refusing to resume")
    for key, shape in expected.items():
        got = arrays.get(key)
        if got is None or got.shape != tuple(shape):
            raise PFedMoAPError(f"{file}: {key} has shape {None if got is None else got.shape}, "
                                f"this run expects {tuple(shape)} (a checkpoint of another run?)")
    return int(attrs["round"]), arrays


def _same_run(run_dir: Path, config_hash: str, ckpt_round: int, expected: dict, recorded_hash,
              hash_of_toml) -> None:
    """Resuming: results.h5 and config.toml are this run's (the checkpoint's, when there is one), and
    results.h5 holds every round the checkpoint covers; else one error and nothing rewritten (a
    checkpoint copied in from another run would otherwise cut and overwrite this one's files)."""
    file = run_dir / RESULTS
    refuse = "refusing to resume (a file copied in from another run?); nothing was changed"
    if not file.exists():
        if ckpt_round:
            raise PFedMoAPError(f"{run_dir}: holds {CHECKPOINT} (round {ckpt_round}) but no {RESULTS}; {refuse}")
    else:
        attrs = read_results(file, rounds=False)["attrs"]
        if attrs.get("schema_version") not in READABLE_RESULTS:
            raise PFedMoAPError(f"{file}: schema version {attrs.get('schema_version')}, this pfedmoap reads "
                                f"{', '.join(map(str, READABLE_RESULTS))}; {refuse}")
        have = recorded_hash(attrs) if "config_hash" in attrs else None
        if have is None and hash_of_toml is not None and isinstance(attrs.get("config"), str):
            have = _hash_of(file, attrs["config"], hash_of_toml)           # schema 1 files
        if have is not None and have != config_hash:
            raise PFedMoAPError(f"{file}: written by a different configuration (run hash {have} != "
                                f"{config_hash}); {refuse}")
        shape = expected.get("clients/state")
        if shape is not None and int(attrs["n_clients"]) != shape[0]:
            raise PFedMoAPError(f"{file}: {attrs['n_clients']} clients, the checkpoint {shape[0]}; {refuse}")
        if int(attrs["rounds_done"]) < ckpt_round:
            raise PFedMoAPError(f"{file}: holds {attrs['rounds_done']} rounds but {CHECKPOINT} {ckpt_round}; "
                                f"{refuse}")
    toml = run_dir / "config.toml"
    if toml.exists() and hash_of_toml is not None:
        try:
            text = toml.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PFedMoAPError(f"{toml}: unreadable ({e}); {refuse}") from None
        have = _hash_of(toml, text, hash_of_toml)
        if have != config_hash:
            raise PFedMoAPError(f"{toml}: another configuration (run hash {have} != {config_hash}); {refuse}")


def _hash_of(file: Path, text: str, hash_of_toml) -> str:
    try:
        return hash_of_toml(text)
    except Exception as e:  # noqa: BLE001 - an edited or foreign file: TOML or validation errors alike
        raise PFedMoAPError(f"{file}: not a valid configuration ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"refusing to resume, nothing was changed") from None
