"""The MPI layer: rank layout, flat float32 buffers, buffer collectives, abort on failure.

The only module that imports mpi4py. It moves arrays and knows no algorithm. Without an MPI launcher
(plain `pfedmoap run`) a `LocalComm` with the same methods stands in and MPI is never initialised.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np

from .errors import PFedMoAPError, ReportedElsewhere

_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALRANKID")


# The number of processes the launcher started, and this one's index, as each launcher says it.
# An MPI launcher's own variables come first: inside a SLURM allocation `mpirun` may start its
# daemons with srun, so the srun step there counts daemons, not ranks.
_SIZE_VARS = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
              ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))
# srun's step. SLURM_NTASKS is no evidence: every sbatch job sets it, also around one process;
# SLURM_STEP_NUM_TASKS with SLURM_STEP_ID and SLURM_PROCID is set only in the tasks of an srun step.
_SRUN_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID")


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _in_srun_step() -> bool:
    return "SLURM_STEP_ID" in os.environ and all(_env_int(v) is not None for v in _SRUN_VARS)


def launcher_size() -> tuple[int, str] | None:
    """(processes the launcher started, the variable that says so), or None without a launcher."""
    for size_var, _ in _SIZE_VARS:
        n = _env_int(size_var)
        if n is not None:
            return n, size_var
    if _in_srun_step():
        return _env_int("SLURM_STEP_NUM_TASKS"), "SLURM_STEP_NUM_TASKS"
    return None


def launcher_rank() -> int:
    """This process's index as the launcher numbered it (0 without a launcher): known before MPI
    starts, so that an error every process meets alike is printed once."""
    for size_var, rank_var in _SIZE_VARS:
        if size_var in os.environ:
            return _env_int(rank_var) or 0
    if "PMIX_RANK" in os.environ:
        return _env_int("PMIX_RANK") or 0
    if _in_srun_step():
        return _env_int("SLURM_PROCID") or 0
    return 0


def launched_by_mpi() -> bool:
    if any(v in os.environ for v in _LAUNCHER_VARS) or os.environ.get("PFEDMOAP_MPI") == "1":
        return True
    launched = launcher_size()
    return launched is not None and launched[0] > 1     # srun -n N without an MPI plugin variable


class LocalComm:
    """World size 1: every collective is a copy."""
    rank, size = 0, 1

    def bcast(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def scatterv(self, send: np.ndarray | None, counts: list[int], recv: np.ndarray) -> np.ndarray:
        recv[...] = send.reshape(recv.shape)
        return recv

    def gatherv(self, send: np.ndarray, counts: list[int]) -> np.ndarray:
        return np.ascontiguousarray(send).reshape(-1)

    def allreduce_max(self, x: int) -> int:
        return x

    def allreduce_min(self, x: int) -> int:
        return x

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        sys.exit(code)


class MPIComm:
    """COMM_WORLD through mpi4py's upper-case (buffer) collectives; rank 0 is the root."""

    def __init__(self):
        import warnings
        with warnings.catch_warnings():
            # mpi4py's own three-line warning when the launcher is another MPI's: world() says it
            # in one line, with both sizes (check_world_size)
            warnings.filterwarnings("ignore", "suspicious MPI execution environment", RuntimeWarning)
            from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def _type(self, arr: np.ndarray):
        return {np.dtype(np.float32): self.MPI.FLOAT, np.dtype(np.int32): self.MPI.INT,
                np.dtype(np.int64): self.MPI.INT64_T, np.dtype(np.float64): self.MPI.DOUBLE}[arr.dtype]

    def _arrive(self) -> None:
        """Wait, sleeping, until every rank reaches the next collective.

        MPI libraries busy-poll inside blocking collectives: a server waiting a whole round for its
        clients would burn a core they need. A non-blocking barrier polled with short sleeps gives
        that core back. The first 5 ms only yield (sleep(0)): most of a round's ~15 collectives
        complete within them, and napping there cost ~6 ms per collective with more ranks than
        cores (docs/benchmarks.md, "Cross-device scale"); a long wait (the server during training)
        still sleeps."""
        req = self.comm.Ibarrier()
        start, nap = time.perf_counter(), 5e-5
        while not req.Test():
            if time.perf_counter() - start < 5e-3:
                time.sleep(0)
            else:
                time.sleep(nap)
                nap = min(nap * 2, 2e-3)

    def bcast(self, buf: np.ndarray) -> np.ndarray:
        buf = np.ascontiguousarray(buf)
        self._arrive()
        self.comm.Bcast([buf, self._type(buf)], root=0)
        return buf

    def scatterv(self, send: np.ndarray | None, counts: list[int], recv: np.ndarray) -> np.ndarray:
        """Rank r receives counts[r] elements of the root's flat `send` (in rank order)."""
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        sendspec = [np.ascontiguousarray(send).reshape(-1), (list(counts), list(displs)),
                    self._type(recv)] if self.rank == 0 else None
        self._arrive()
        self.comm.Scatterv(sendspec, [recv.reshape(-1), self._type(recv)], root=0)
        return recv

    def gatherv(self, send: np.ndarray, counts: list[int]) -> np.ndarray | None:
        """The root receives every rank's flat `send` concatenated in rank order."""
        send = np.ascontiguousarray(send).reshape(-1)
        recv = None
        if self.rank == 0:
            recv = np.empty(int(sum(counts)), send.dtype)
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
            recvspec = [recv, (list(counts), list(displs)), self._type(send)]
        else:
            recvspec = None
        self._arrive()
        self.comm.Gatherv([send, self._type(send)], recvspec, root=0)
        return recv

    def allreduce_max(self, x: int) -> int:
        return self._allreduce(x, self.MPI.MAX)

    def allreduce_min(self, x: int) -> int:
        return self._allreduce(x, self.MPI.MIN)

    def _allreduce(self, x: int, op) -> int:
        buf = np.array([x], np.int64)
        out = np.empty_like(buf)
        self._arrive()
        self.comm.Allreduce([buf, self.MPI.INT64_T], [out, self.MPI.INT64_T], op=op)
        return int(out[0])

    def barrier(self) -> None:
        self._arrive()

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


_NO_LIBMPI = ("install pip's MPICH (pip install -e '.[mpi]') or load the site MPI "
              "(README, 'MPI and clusters')")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def library_versions() -> str:
    try:
        import mpi4py
    except ImportError:
        return "mpi4py: not installed"
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:     # mpi4py's wheel finds no libmpi
        return f"mpi4py {mpi4py.__version__}; MPI library: none ({_first_line(e)}; {_NO_LIBMPI})"
    return f"mpi4py {mpi4py.__version__}; MPI library: {MPI.Get_library_version().strip().splitlines()[0]}"


def world() -> LocalComm | MPIComm:
    if not launched_by_mpi():
        return LocalComm()
    try:
        comm = MPIComm()
    except ImportError as e:
        raise PFedMoAPError(f"launched under MPI but mpi4py cannot be imported: {_first_line(e)}; "
                            f"{_NO_LIBMPI}") from None
    except (RuntimeError, OSError) as e:
        raise PFedMoAPError(f"launched under MPI but mpi4py finds no MPI library: {_first_line(e)}; "
                            f"{_NO_LIBMPI}") from None
    check_world_size(comm.size, launcher_size())
    return comm


def check_world_size(size: int, launched: tuple[int, str] | None) -> None:
    """N processes started by the launcher but a world of 1 in each: N independent copies of the
    same run would write into one directory. Refused, naming both numbers."""
    if size != 1 or launched is None or launched[0] <= 1:
        return
    n, var = launched
    raise PFedMoAPError(
        f"the launcher started {n} processes ({var}={n}) but MPI reports a world size of {size} in "
        f"each: mpi4py is most likely built for another MPI than the launcher's "
        f"({' '.join(library_versions().split())}); start it with that MPI's own mpiexec, or "
        f"rebuild mpi4py against the launcher's MPI (README, 'MPI and clusters')")


def place_clients(n_train: np.ndarray, size: int, block: int = 1) -> np.ndarray:
    """Owner rank of each client: rank 0 alone hosts all with one rank; otherwise ranks 1..size-1
    host contiguous groups balanced by training-set size (deterministic from the data). With
    `block` > 1 (train.client_block) the groups are made of whole id-blocks (ids b*block ..
    (b+1)*block-1), so that a block of clients trained together is the same at any number of ranks."""
    n = len(n_train)
    if size == 1:
        return np.zeros(n, np.int32)
    groups = size - 1
    units = -(-n // block)
    if groups > units:
        if block == 1:
            raise PFedMoAPError(f"world size {size}: {groups} client ranks but only {n} clients "
                                f"(data.n_clients); use at most {n + 1} ranks")
        raise PFedMoAPError(f"world size {size}: {groups} client ranks but only {units} blocks of "
                            f"train.client_block = {block} clients ({n} clients); use at most {units + 1} "
                            f"ranks or a smaller train.client_block")
    weight = np.maximum(np.asarray(n_train, np.float64), 1)
    load = np.cumsum(np.add.reduceat(weight, np.arange(0, n, block)) if block > 1 else weight)
    owner = np.empty(units, np.int32)
    start = 0
    for g in range(groups):
        remaining_groups = groups - g - 1
        if remaining_groups == 0:
            stop = units
        else:
            target = load[-1] * (g + 1) / groups
            stop = int(np.searchsorted(load, target, side="left")) + 1
            # closer boundary of the two candidates, keeping one client per group at least
            if stop - 1 > start and abs(load[stop - 2] - target) <= abs(load[stop - 1] - target):
                stop -= 1
            stop = min(max(stop, start + 1), units - remaining_groups)
        owner[start:stop] = g + 1
        start = stop
    return np.repeat(owner, block)[:n]


def agree(comm, error: PFedMoAPError | None) -> None:
    """Every rank calls this at the same point: if any rank met a user error, all raise, so no
    rank goes on into a collective the others will never reach. Only the lowest failing rank
    keeps its message (and prints it); the others exit 2 quietly."""
    first = comm.allreduce_min(comm.rank if error is not None else comm.size)
    if first == comm.size:
        return
    if comm.rank == first:
        error.agreed = True          # every rank stops here: no abort needed (cli.main)
        raise error
    raise ReportedElsewhere(f"rank {first} reported an error")


def fail(comm, exc: BaseException) -> None:
    """An exception on one rank, after the ranks agreed on their set-up, ends the whole world: one
    line from the failing rank, then MPI_Abort, so no rank waits forever in a collective.

    A user error (PFedMoAPError: an unreadable image, a non-finite loss) exits 2; any other
    exception is a bug: exit 1, its traceback kept in a file named on the line."""
    where = "" if comm.size == 1 else f" (rank {comm.rank})"
    if isinstance(exc, PFedMoAPError):
        print(f"error{where}: {exc}", file=sys.stderr)
        code = 2
    else:
        import tempfile
        text = "".join(traceback.format_exception(exc))
        try:
            fd, path = tempfile.mkstemp(prefix=f"pfedmoap-rank{comm.rank}-", suffix=".traceback")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            kept = f"traceback in {path}"
        except OSError:
            kept = "traceback follows"
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error{where}: {type(exc).__name__}: {first} ({kept})", file=sys.stderr)
        if kept == "traceback follows":
            sys.stderr.write(text)
        code = 1
    if comm.size > 1:
        comm.abort(code)
    sys.exit(code)
