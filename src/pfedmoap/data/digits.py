"""The embedded benchmark `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, with domain shift.

Nothing is read from disk but the CSV that ships inside scikit-learn.

- The 1,797 images are split once, stratified by class with a fixed seed, into a *pretraining half*
  (`pretraining_half()`; it pretrains the micro CLIP shipped in `pfedmoap/weights`, see
  `tools/pretrain_micro_clip.py`) and a *federated half*, never seen by that model.
- The federated half is split, stratified, into train (70 %) and test (30 %).
- Each domain is a deterministic transform of the image; every domain holds a transformed copy of
  every federated-half image (so all domains have the same size and the same labels, in the same
  order). Domains, in canonical order (`DOMAINS`), with the shipped micro CLIP's zero-shot test
  accuracy ("a photo of a {}."):
    original  the image as is                                  0.98
    noise     + gaussian noise, std 0.45, seeded per image      0.54
    blur      gaussian blur, std 3.5 px (of 32)                 0.86
    contrast  intensities squeezed into [0.375, 0.625]          0.74
    rotate    rotated 30 degrees counter-clockwise              0.64
    mirror    mirrored left-right                               0.32

Images are upscaled from 8x8 to 32x32 (bilinear), white ink on black, and handed out as RGB uint8.
Image keys (for the feature cache) are `digits/<domain>/<index in load_digits()>`.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PFedMoAPError
from .base import FederatedDataset, ImageSplit
from .datasets import register

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DOMAINS = ("original", "noise", "blur", "contrast", "rotate", "mirror")
IMAGE_SIZE = 32

SPLIT_SEED = 20240601          # the pretraining/federated split and the federated train/test split
PRETRAIN_FRACTION = 0.5
FEDERATED_TRAIN_FRACTION = 0.7

# Domain parameters (part of the benchmark's definition: changing them changes every result).
NOISE_SIGMA = 0.45             # gaussian pixel noise, std in units of the [0, 1] intensity range
NOISE_SEED = 7                 # noise of image i is drawn from default_rng([NOISE_SEED, i])
BLUR_SIGMA = 3.5               # gaussian blur std (pixels of the 32x32 image), zero padding
CONTRAST_RANGE = (0.375, 0.625)  # intensities [0, 1] are squeezed into this range
ROTATE_DEGREES = 30.0          # counter-clockwise about the centre, bilinear, black fill


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator):
    """Indices (first, second): per class, a seeded permutation; the first round(n*fraction) go first."""
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * fraction))
        first.append(idx[:k])
        second.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    # Read the CSV that `sklearn.datasets.load_digits()` reads, without importing scikit-learn
    # (0.7 s); the same array either way.
    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        flat, target = data[:, :-1], data[:, -1]
    else:  # pragma: no cover - another scikit-learn layout
        from sklearn.datasets import load_digits
        d = load_digits()
        flat, target = d.data, d.target
    images = np.asarray(flat, np.float32).reshape(-1, 8, 8) / 16.0   # (1797, 8, 8), ink = 1
    labels = np.asarray(target, np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """Indices into `load_digits()`: 'pretrain', 'train' and 'test' (the last two: federated half)."""
    _, labels = _raw()
    rng = np.random.default_rng(SPLIT_SEED)
    pre, fed = _stratified_split(labels, PRETRAIN_FRACTION, rng)
    tr, te = _stratified_split(labels[fed], FEDERATED_TRAIN_FRACTION, rng)
    out = {"pretrain": pre, "train": fed[tr], "test": fed[te]}
    for v in out.values():
        v.setflags(write=False)
    return out


def _upscale(img8: np.ndarray) -> np.ndarray:
    """8x8 float [0, 1] -> 32x32 float [0, 1] (bilinear)."""
    im = Image.fromarray(np.ascontiguousarray(img8, np.float32))     # mode "F"
    return np.clip(np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)), 0.0, 1.0)


@lru_cache(maxsize=1)
def _upscaled_all() -> np.ndarray:
    images, _ = _raw()
    out = np.stack([_upscale(x) for x in images])              # (1797, 32, 32) float32
    out.setflags(write=False)
    return out


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur, kernel truncated at 4 sigma, zero padding (as scipy's mode='constant')."""
    r = int(4 * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x.astype(np.float64), r)
    p = np.apply_along_axis(np.convolve, 0, p, k, mode="valid")
    p = np.apply_along_axis(np.convolve, 1, p, k, mode="valid")
    return p.astype(np.float32)


def _transform(domain: str, x: np.ndarray, index: int) -> np.ndarray:
    """One 32x32 float image in [0, 1] -> its copy in `domain` (float, [0, 1]). Deterministic."""
    if domain == "original":
        return x
    if domain == "noise":
        rng = np.random.default_rng([NOISE_SEED, int(index)])
        return np.clip(x + rng.normal(0.0, NOISE_SIGMA, x.shape), 0.0, 1.0)
    if domain == "blur":
        return _gaussian_blur(x, BLUR_SIGMA)
    if domain == "contrast":
        lo, hi = CONTRAST_RANGE
        return lo + (hi - lo) * x
    if domain == "rotate":
        im = Image.fromarray(np.ascontiguousarray(x, np.float32))
        return np.asarray(im.rotate(ROTATE_DEGREES, resample=Image.BILINEAR), np.float32)
    if domain == "mirror":
        return x[:, ::-1]
    raise KeyError(domain)


def _to_rgb_uint8(x: np.ndarray) -> np.ndarray:
    g = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


@lru_cache(maxsize=None)
def domain_images(domain: str, indices: tuple[int, ...] | None = None) -> np.ndarray:
    """RGB uint8 (n, 32, 32, 3): images `indices` of `load_digits()` (default: all) in `domain`."""
    if domain not in DOMAINS:
        raise KeyError(domain)
    up = _upscaled_all()
    idx = range(len(up)) if indices is None else indices
    out = np.stack([_to_rgb_uint8(_transform(domain, up[i], i)) for i in idx])
    out.setflags(write=False)
    return out


def _split_arrays(part: str, domain: str) -> tuple[np.ndarray, np.ndarray]:
    idx = split_indices()[part]
    _, labels = _raw()
    return domain_images(domain, tuple(int(i) for i in idx)), labels[idx]


def pretraining_half() -> tuple[np.ndarray, np.ndarray]:
    """(images RGB uint8 (n, 32, 32, 3), labels): the original-domain pretraining half."""
    return _split_arrays("pretrain", "original")


def federated_split(part: str, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the federated half's `part` ('train' or 'test') in one domain."""
    if part not in ("train", "test"):
        raise KeyError(part)
    return _split_arrays(part, domain)


def _resolve_domains(requested) -> list[str]:
    requested = list(requested or [])
    if not requested:
        return list(DOMAINS)
    for d in requested:
        if d not in DOMAINS:
            raise PFedMoAPError(f"data.domains: unknown domain {d!r} for data set 'digits'; "
                                f"expected some of {list(DOMAINS)}")
    if len(set(requested)) != len(requested):
        raise PFedMoAPError(f"data.domains = {requested!r}: a domain is listed twice for data set "
                            f"'digits'; expected distinct names from {list(DOMAINS)}")
    return requested


def _make_split(part: str, domains: list[str]) -> ImageSplit:
    ims, labs, doms, keys = [], [], [], []
    idx = split_indices()[part]
    for d_id, d in enumerate(domains):
        x, y = federated_split(part, d)
        ims.append(x)
        labs.append(y)
        doms.append(np.full(len(y), d_id, np.int64))
        keys.extend(f"digits/{d}/{int(i)}" for i in idx)
    images = np.concatenate(ims) if len(ims) > 1 else ims[0]

    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i])

    return ImageSplit(load, np.concatenate(labs), np.concatenate(doms), keys)


@register("digits")
def build(cfg) -> FederatedDataset:
    domains = _resolve_domains(getattr(cfg, "domains", None))
    return FederatedDataset(name="digits", classnames=list(CLASSNAMES),
                            train=_make_split("train", domains), test=_make_split("test", domains),
                            domain_names=domains)


def zero_shot_per_domain(model, part: str = "test") -> dict[str, float]:
    """Zero-shot accuracy (the hand prompt) of a CLIP `model` on the federated half's `part`, per
    domain. Here, not in clip/: the model layer knows no data set."""
    from ..clip.micro import zero_shot_accuracy
    return {d: zero_shot_accuracy(model, *federated_split(part, d), CLASSNAMES) for d in DOMAINS}
