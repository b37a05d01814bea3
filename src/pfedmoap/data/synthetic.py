"""`synthetic`: generated images for scale tests; any number of classes and samples."""
from __future__ import annotations

import numpy as np

from .base import FederatedDataset, ImageSplit
from .datasets import register


def _images(labels: np.ndarray, n_classes: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    # Each class is a fixed random colour pattern; samples are that pattern plus noise.
    patterns = np.random.default_rng(12345).uniform(0, 255, (n_classes, size, size, 3))
    x = patterns[labels] + rng.normal(0, 40, (len(labels), size, size, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


@register("synthetic")
def build(cfg) -> FederatedDataset:
    rng = np.random.default_rng(0)
    c = cfg.n_classes
    y_train = np.arange(cfg.n_train) % c
    y_test = np.arange(cfg.n_test) % c
    return FederatedDataset(
        name="synthetic",
        classnames=[f"pattern {i}" for i in range(c)],
        train=ImageSplit.from_arrays(_images(y_train, c, rng), y_train),
        test=ImageSplit.from_arrays(_images(y_test, c, rng), y_test),
    )
