"""What every data set hands to the rest of the system: images with aligned labels and domains."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image


def pixels_id(images: np.ndarray) -> str:
    """A content id of in-memory images: sha256 of their shape, dtype and bytes."""
    a = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(a.tobytes())
    return "pixels:" + h.hexdigest()


class ImageSplit:
    """Images with aligned integer labels and domain ids.

    `load(i)` returns image i as an RGB PIL image; images are loaded lazily so a data set on disk
    costs nothing until its features are computed (once, see features.py).
    """

    def __init__(self, load: Callable[[int], Image.Image], labels: Sequence[int],
                 domains: Sequence[int] | None = None, keys: Sequence[str] | None = None,
                 files: Sequence[str | os.PathLike] | None = None, identity: str | None = None):
        self.load = load
        self.labels = np.asarray(labels, dtype=np.int64)
        n = len(self.labels)
        self.domains = np.zeros(n, np.int64) if domains is None else np.asarray(domains, np.int64)
        if len(self.domains) != n:
            raise ValueError("domains and labels differ in length")
        # keys identify images stably (file paths, or index strings) for the feature cache.
        self.keys = list(keys) if keys is not None else [str(i) for i in range(n)]
        # What the feature cache's key covers besides the keys (see features.cache_key):
        # `files`, one path per image for images read from disk (their size and mtime are part of
        # the key), and `identity`, a string naming the content's source (a resolved data root, a
        # hash of in-memory pixels). Neither given: the key hashes the images' pixels.
        self.files = [Path(f) for f in files] if files is not None else None
        if self.files is not None and len(self.files) != n:
            raise ValueError("files and labels differ in length")
        self.identity = identity

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels, domains=None) -> "ImageSplit":
        """uint8 arrays (N, H, W) or (N, H, W, 3) held in memory."""
        def load(i: int) -> Image.Image:
            return Image.fromarray(images[i]).convert("RGB")
        return cls(load, labels, domains, identity=pixels_id(images))


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
