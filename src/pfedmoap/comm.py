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


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS) or os.environ.get("PFEDMOAP_MPI") == "1"


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
        clients would burn a core they need. A non-blocking barrier polled with short sleeps costs
        well under a millisecond per exchange and gives that core back."""
        req = self.comm.Ibarrier()
        nap = 5e-5
        while not req.Test():
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


def library_versions() -> str:
    try:
        import mpi4py
        from mpi4py import MPI
    except ImportError:
        return "mpi4py: not installed"
    return f"mpi4py {mpi4py.__version__}; MPI library: {MPI.Get_library_version().strip().splitlines()[0]}"


def world() -> LocalComm | MPIComm:
    if not launched_by_mpi():
        return LocalComm()
    try:
        return MPIComm()
    except ImportError as e:
        raise PFedMoAPError(f"launched under MPI but mpi4py cannot be imported: {e}") from None


def place_clients(n_train: np.ndarray, size: int) -> np.ndarray:
    """Owner rank of each client: rank 0 alone hosts all with one rank; otherwise ranks 1..size-1
    host contiguous groups balanced by training-set size (deterministic from the data)."""
    n = len(n_train)
    if size == 1:
        return np.zeros(n, np.int32)
    groups = size - 1
    if groups > n:
        raise PFedMoAPError(f"world size {size}: {groups} client ranks but only {n} clients "
                            f"(data.n_clients); use at most {n + 1} ranks")
    load = np.cumsum(np.maximum(n_train, 1), dtype=np.float64)
    owner = np.empty(n, np.int32)
    start = 0
    for g in range(groups):
        remaining_groups = groups - g - 1
        if remaining_groups == 0:
            stop = n
        else:
            target = load[-1] * (g + 1) / groups
            stop = int(np.searchsorted(load, target, side="left")) + 1
            # closer boundary of the two candidates, keeping one client per group at least
            if stop - 1 > start and abs(load[stop - 2] - target) <= abs(load[stop - 1] - target):
                stop -= 1
            stop = min(max(stop, start + 1), n - remaining_groups)
        owner[start:stop] = g + 1
        start = stop
    return owner


def agree(comm, error: PFedMoAPError | None) -> None:
    """Every rank calls this at the same point: if any rank met a user error, all raise, so no
    rank goes on into a collective the others will never reach. Only the lowest failing rank
    keeps its message (and prints it); the others exit 2 quietly."""
    first = comm.allreduce_min(comm.rank if error is not None else comm.size)
    if first == comm.size:
        return
    if comm.rank == first:
        raise error
    raise ReportedElsewhere(f"rank {first} reported an error")


def fail(comm, exc: BaseException) -> None:
    """An exception on any rank ends the whole world: no rank waits forever in a collective."""
    if isinstance(exc, PFedMoAPError):
        print(f"error: {exc}" if comm.size == 1 else f"error (rank {comm.rank}): {exc}", file=sys.stderr)
        code = 2
    else:
        tb = traceback.format_exception(exc)
        prefix = f"[rank {comm.rank}] " if comm.size > 1 else ""
        sys.stderr.write("".join(prefix + line for chunk in tb for line in chunk.splitlines(True)))
        code = 1
    if comm.size > 1:
        comm.abort(code)
    sys.exit(code)
