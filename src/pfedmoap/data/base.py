"""What every data set hands to the rest of the system: images with aligned labels and domains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image


class ImageSplit:
    """Images with aligned integer labels and domain ids.

    `load(i)` returns image i as an RGB PIL image; images are loaded lazily so a data set on disk
    costs nothing until its features are computed (once, see features.py).
    """

    def __init__(self, load: Callable[[int], Image.Image], labels: Sequence[int],
                 domains: Sequence[int] | None = None, keys: Sequence[str] | None = None):
        self.load = load
        self.labels = np.asarray(labels, dtype=np.int64)
        n = len(self.labels)
        self.domains = np.zeros(n, np.int64) if domains is None else np.asarray(domains, np.int64)
        if len(self.domains) != n:
            raise ValueError("domains and labels differ in length")
        # keys identify images stably (file paths, or index strings) for the feature cache.
        self.keys = list(keys) if keys is not None else [str(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels, domains=None) -> "ImageSplit":
        """uint8 arrays (N, H, W) or (N, H, W, 3) held in memory."""
        def load(i: int) -> Image.Image:
            return Image.fromarray(images[i]).convert("RGB")
        return cls(load, labels, domains)


@dataclass
class FederatedDataset:
    name: str
    classnames: list[str]          # ordered by label id, readable words ("water lily")
    train: ImageSplit
    test: ImageSplit
    domain_names: list[str] = field(default_factory=lambda: ["all"])
    superclass: np.ndarray | None = None   # class id -> super-class id (CIFAR-100)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)
