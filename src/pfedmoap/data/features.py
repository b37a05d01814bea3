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
    """What the cached features of one split (and view) depend on: the backbone's weights and
    preprocessing, the images' names and where their content comes from (see `content_id`)."""
    split = getattr(dataset, split_name)
    h = hashlib.sha256()
    for part in (backbone.name, backbone.weights_id, str(backbone.preprocess), dataset.name, split_name,
                 backbone.precision, f"view={view}", *split.keys, content_id(split)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def content_id(split) -> str:
    """An id of the split's image content, cheap to take.

    Images on disk (`split.files`): the split's `identity` (the data set's resolved root), or each
    file's absolute path when there is none, and each file's size and mtime_ns: one stat per file,
    nothing read, so another root with the same layout, or an image rewritten in place, is another
    id. In-memory images: their `identity` (a pixel hash, or the source files' stats); failing
    that, a hash of every image's pixels (computed once per split object)."""
    files = getattr(split, "files", None)
    identity = getattr(split, "identity", None)
    if files is None:
        if identity:
            return identity
        cached = getattr(split, "_pixels_id", None)
        if cached is None:
            h = hashlib.sha256()
            for i in range(len(split)):
                a = np.ascontiguousarray(np.asarray(split.load(i)))
                h.update(f"{a.shape}|{a.dtype.str}|".encode())
                h.update(a.tobytes())
            cached = "pixels:" + h.hexdigest()
            split._pixels_id = cached
        return cached
    h = hashlib.sha256((identity or "").encode() + b"\0")
    for p in files:
        try:
            st = os.stat(p)
        except OSError as e:
            raise PFedMoAPError(f"image {p}: cannot stat it for the feature cache's key "
                                f"({e.strerror or type(e).__name__})") from None
        name = "" if identity else os.path.abspath(p)
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return "files:" + h.hexdigest()


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
