"""Expert selection: which K-1 pool prompts each client receives as non-local experts.

Pure functions of the pool, the seed and the round. A client never receives itself, clients that
never uploaded are never experts, and ids are client ids (never positions in a list).
"""
from __future__ import annotations

import numpy as np

from . import rng


FLOAT32_SAFE = 1e15          # |value| below which squares and dot products of prompts fit float32
ROUTERS: dict = {}           # the registry: moe.router name -> router function


def register(name: str):
    def deco(fn):
        ROUTERS[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return list(ROUTERS)


def route(method: str, pool: np.ndarray, in_pool: np.ndarray, queries: np.ndarray, clients: np.ndarray,
          n: int, seed: int, round_: int) -> np.ndarray:
    """Experts for `clients`: (len(clients), n) int32 client ids, -1 where fewer than n exist.

    pool (N, P): each client's latest upload; in_pool (N,) bool: the client has uploaded;
    queries (len(clients), P): the prompt each client is compared by (`knn`)."""
    out = np.full((len(clients), n), -1, np.int32)
    if n == 0 or not in_pool.any():
        return out
    if method not in ROUTERS:
        raise ValueError(method)
    ROUTERS[method](out, pool, in_pool, queries, clients, n, seed, round_)
    return out


@register("knn")
def _knn(out, pool, in_pool, queries, clients, n, seed, round_):
    """The n prompts nearest to the client's query (L2), ties by client id."""
    cand = np.flatnonzero(in_pool)
    # One batched distance matrix for all clients (float32 BLAS), then only the n nearest sorted.
    # Finite prompts whose squares would overflow float32 (uploads noised to ~1e30 by a huge
    # dp.noise_multiplier) are compared in float64 instead: distances stay finite, no warning.
    wide = max(np.abs(queries).max(initial=0), np.abs(pool[cand]).max(initial=0)) > FLOAT32_SAFE
    q = queries.astype(np.float64 if wide else np.float32)
    p = pool[cand].astype(np.float64 if wide else np.float32)
    d = (q * q).sum(1, dtype=np.float64)[:, None] + (p * p).sum(1, dtype=np.float64)[None, :] \
        - 2 * (q @ p.T).astype(np.float64)
    d[cand[None, :] == clients[:, None]] = np.inf
    k = min(n, len(cand))
    near = np.argpartition(d, k - 1, axis=1)[:, :k] if k < len(cand) else np.tile(np.arange(len(cand)), (len(clients), 1))
    for i in range(len(clients)):
        order = near[i][np.lexsort((cand[near[i]], d[i, near[i]]))]     # by distance, then id
        chosen = cand[order][np.isfinite(d[i, order])]
        out[i, :len(chosen)] = chosen


@register("random")
def _random(out, pool, in_pool, queries, clients, n, seed, round_):
    """n clients drawn anew each round, keyed by (seed, round, client)."""
    for i, c in enumerate(clients):
        cand = np.flatnonzero(in_pool & (np.arange(len(in_pool)) != c))
        chosen = rng.numpy_rng(seed, "router", round_, int(c)).permutation(cand)[:n]
        out[i, :len(chosen)] = chosen


@register("fixed")
def _fixed(out, pool, in_pool, queries, clients, n, seed, round_):
    """The reference code's selection: one seeded permutation, its first n trained clients."""
    perm = rng.numpy_rng(seed, "router-fixed").permutation(len(in_pool))
    perm = perm[in_pool[perm]]
    for i, c in enumerate(clients):
        chosen = perm[perm != c][:n]
        out[i, :len(chosen)] = chosen
