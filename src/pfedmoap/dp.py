"""Differential privacy on what other clients see: clip the uploaded prompt's L2 norm, add noise.

Applied on the client to the copy it uploads, before the prompt enters the pool or the average;
the client keeps its own un-noised prompt.
"""
from __future__ import annotations

import numpy as np


def privatize(prompt: np.ndarray, clip: float, noise_multiplier: float, gen: np.random.Generator) -> np.ndarray:
    if clip <= 0:
        return prompt
    norm = float(np.linalg.norm(prompt))
    out = prompt * min(1.0, clip / norm) if norm > 0 else prompt.copy()
    if noise_multiplier > 0:
        out = out + gen.normal(0.0, noise_multiplier * clip, size=prompt.shape)
    return out.astype(np.float32)
