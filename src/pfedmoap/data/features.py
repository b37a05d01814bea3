"""Frozen image features: computed once per image, kept in memory, optionally cached in HDF5.

Images are encoded in fixed chunks of the data set's own index order, so a feature never depends on
which other images a rank happened to need (identical results at any number of ranks).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import rng
from ..errors import PFedMoAPError

CHUNK = 256


def train_transform(backbone):
    """CoOp's training augmentation: random resized crop and horizontal flip, then CLIP's normalisation."""
    from torchvision import transforms as T
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    normalize = next(t for t in backbone.preprocess.transforms if isinstance(t, T.Normalize))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), normalize])


def cache_key(backbone, dataset, split_name: str, view: int | None = None) -> str:
    split = getattr(dataset, split_name)
    h = hashlib.sha256()
    for part in (backbone.name, backbone.weights_id, str(backbone.preprocess), dataset.name, split_name,
                 backbone.precision, f"view={view}", *split.keys):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def compute(backbone, split, indices: np.ndarray | None = None, view: int | None = None) -> np.ndarray:
    """Features (len(split), D) float32; rows outside `indices` (when given) are left at zero.

    `view` None: CLIP's eval preprocessing. `view` v: augmented view v, whose random crop and flip
    are keyed by (v, image index) alone, so every run and every rank sees the same view v."""
    n = len(split)
    feats = np.zeros((n, backbone.embed_dim), np.float32)
    need = np.ones(n, bool) if indices is None else np.isin(np.arange(n), indices)
    transform = backbone.preprocess if view is None else train_transform(backbone)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        if not need[start:stop].any():
            continue
        images = []
        with torch.random.fork_rng(devices=[]):
            for i in range(start, stop):
                if view is not None:
                    torch.manual_seed(rng.key(0, "augment", view, i))
                images.append(transform(split.load(i)))
        feats[start:stop] = backbone.encode_images(torch.stack(images)).numpy()
    return feats


def cache_path(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"features-{key}.h5"


def read(path: Path, n: int, dim: int) -> np.ndarray | None:
    """The cached features, or None when the file is missing or does not match."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            x = f["features"][()]
    except (OSError, KeyError):
        return None
    return x if x.shape == (n, dim) else None


def write(path: Path, feats: np.ndarray) -> None:
    """Atomic: a temporary file renamed over the target, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PFedMoAPError(f"data.cache_dir = {str(path.parent)!r}: cannot create: {e.strerror}") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
    os.replace(tmp, path)
