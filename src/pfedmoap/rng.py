"""Keyed random draws: every draw is a pure function of (seed, purpose, round, client).

Never keyed by rank or position in a group, so results do not depend on the number of ranks, and a
resumed run draws exactly what an uninterrupted one would (no RNG state to carry).
"""
from __future__ import annotations

import hashlib

import numpy as np


def key(seed: int, purpose: str, round_: int = 0, client: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/{purpose}/{round_}/{client}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numpy_rng(seed: int, purpose: str, round_: int = 0, client: int = 0) -> np.random.Generator:
    return np.random.default_rng(key(seed, purpose, round_, client))


def torch_generator(seed: int, purpose: str, round_: int = 0, client: int = 0) -> "torch.Generator":
    import torch        # here: the light modules that key numpy draws (router, partition) need no torch
    return torch.Generator().manual_seed(key(seed, purpose, round_, client))


def dropped(seed: int, round_: int, participants, rate: float, n: int) -> np.ndarray:
    """(n,) bool: the round's participants whose upload does not arrive (train.drop_rate), each
    independently with probability `rate`, keyed by (seed, "drop", round, client); no draw at rate 0."""
    out = np.zeros(n, bool)
    if rate > 0:
        for c in participants:
            out[int(c)] = numpy_rng(seed, "drop", round_, int(c)).random() < rate
    return out
