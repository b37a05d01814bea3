"""Moving a method's declared arrays between the server (rank 0) and the clients' ranks.

The transport half of the round (FedLab's "manager"): it knows array names, widths and row counts,
never what they mean. Per exchange: one small Scatterv of a header (which arrays are present and
how many rows each hosted client receives), then one collective per array kind — Bcast for a
broadcast array, Scatterv for rows per client, Gatherv for uploads. Bytes are counted per client
from the rows actually moved (the header is protocol, not payload, and is not counted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Array:
    """One kind of array a method moves (algorithms.base.Arrays declares them); `width` values per row."""
    name: str
    width: int
    dtype: str = "float32"          # float32 | int32
    broadcast: bool = False         # the same row for every recipient (Bcast) vs rows per client


@dataclass
class Broadcast:
    """A payload: `row` for every client in `to` (a (N,) bool mask)."""
    row: np.ndarray
    to: np.ndarray


@dataclass
class PerClient:
    """A payload: client c receives counts[c] rows; `rows` holds them client by client."""
    rows: np.ndarray
    counts: np.ndarray


class Transport:
    def __init__(self, comm, owner: np.ndarray):
        self.comm, self.owner = comm, owner
        self.N = len(owner)
        self.mine = np.flatnonzero(owner == comm.rank)
        self.hosted = np.bincount(owner, minlength=comm.size)
        self.root = comm.rank == 0

    def down(self, specs: tuple[Array, ...], payloads: dict | None
             ) -> tuple[dict[int, dict[str, np.ndarray]], np.ndarray | None]:
        """Payloads (root: name -> Broadcast | PerClient) to their clients.

        Returns each hosted client's downloads {cid: {name: array}} (a broadcast row, or the
        client's (rows, width) block; an array a client was sent no row of is absent) and, on the root, the bytes each client received (N,)."""
        out = {int(c): {} for c in self.mine}
        if not specs:
            return out, np.zeros(self.N, np.int64) if self.root else None
        n_spec = len(specs)
        counts = None
        if self.root:
            unknown = set(payloads) - {s.name for s in specs}
            if unknown:
                raise ValueError(f"payloads {sorted(unknown)} are not declared arrays")
            counts = np.zeros((self.N, n_spec), np.int64)
            absent = np.zeros(n_spec, bool)
            for k, s in enumerate(specs):
                p = payloads.get(s.name)
                if p is None:
                    absent[k] = True
                    continue
                if s.broadcast != isinstance(p, Broadcast):
                    raise ValueError(f"array {s.name!r}: payload {type(p).__name__} for broadcast={s.broadcast}")
                counts[:, k] = p.to.astype(np.int64) if s.broadcast else p.counts
            totals = np.where(absent, -1, counts.sum(0))      # -1: not sent this round
            header = np.concatenate([np.concatenate([totals, counts[self.owner == r].reshape(-1)])
                                     for r in range(self.comm.size)])
        recv = np.empty(n_spec + len(self.mine) * n_spec, np.int64)
        self.comm.scatterv(header if self.root else None,
                           [n_spec + int(h) * n_spec for h in self.hosted], recv)
        totals, mine_counts = recv[:n_spec], recv[n_spec:].reshape(len(self.mine), n_spec)
        for k, s in enumerate(specs):
            if totals[k] < 0 or (s.broadcast and totals[k] == 0):
                continue
            dtype = np.dtype(s.dtype)
            if s.broadcast:
                row = payloads[s.name].row.astype(dtype).reshape(s.width) if self.root else np.empty(s.width, dtype)
                row = self.comm.bcast(row)
                for i, c in enumerate(self.mine):
                    if mine_counts[i, k]:
                        out[int(c)][s.name] = row
                continue
            send = None
            if self.root:
                send = np.ascontiguousarray(payloads[s.name].rows, dtype).reshape(-1, s.width)
                if len(send) != totals[k]:
                    raise ValueError(f"array {s.name!r}: {len(send)} rows for counts summing to {totals[k]}")
            per_rank = [int(counts[self.owner == r, k].sum()) * s.width for r in range(self.comm.size)] \
                if self.root else [0] * self.comm.size
            rows = np.empty((int(mine_counts[:, k].sum()), s.width), dtype)
            if totals[k]:
                rows = self.comm.scatterv(send, per_rank, rows)
            at = 0
            for i, c in enumerate(self.mine):
                n = int(mine_counts[i, k])
                if n:                    # a client holds an array only if it was sent rows of it
                    out[int(c)][s.name] = rows[at:at + n]
                at += n
        nbytes = None
        if self.root:
            item = np.array([np.dtype(s.dtype).itemsize * s.width for s in specs], np.int64)
            nbytes = counts @ item
        return out, nbytes

    def up(self, specs: tuple[Array, ...], participants: np.ndarray, uploads: dict[int, dict[str, np.ndarray]]
           ) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
        """One row per participant and array, gathered to the root in participant (client id) order.

        uploads: {cid: {name: row}} for the hosted participants. Returns (root: name -> (n, width)
        rows, else None) and the bytes each client sent (N,)."""
        is_part = np.zeros(self.N, bool)
        is_part[participants] = True
        nbytes = np.zeros(self.N, np.int64)
        if not specs:
            return ({} if self.root else None), nbytes
        mine_part = [int(c) for c in self.mine if is_part[c]]
        n_part = [int(is_part[self.owner == r].sum()) for r in range(self.comm.size)]
        got = {} if self.root else None
        for s in specs:
            dtype = np.dtype(s.dtype)
            rows = np.zeros((len(mine_part), s.width), dtype)
            for i, c in enumerate(mine_part):
                row = np.asarray(uploads[c][s.name]).reshape(-1)
                if row.size != s.width:
                    raise ValueError(f"client {c}: upload {s.name!r} has {row.size} values, declared {s.width}")
                rows[i] = row
            recv = self.comm.gatherv(rows, [n * s.width for n in n_part])
            if self.root:
                got[s.name] = recv.reshape(-1, s.width)
            nbytes[is_part] += dtype.itemsize * s.width
        return got, nbytes
