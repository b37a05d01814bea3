"""Data-set registry: a name maps to a builder `build(cfg: DataConfig) -> FederatedDataset`.

Builders live in their own modules and register themselves on import; adding a data set is one
module plus one line in `_MODULES`.
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..errors import PFedMoAPError
from .base import FederatedDataset

_BUILDERS: dict[str, Callable] = {}
_MODULES = ("synthetic", "digits", "disk")


def register(*names: str):
    def deco(fn):
        for n in names:
            _BUILDERS[n] = fn
        return fn
    return deco


def available() -> list[str]:
    _import_all()
    return sorted(_BUILDERS)


def _import_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__package__}.{m}")
        except ModuleNotFoundError as e:  # a module not written yet must not break the others
            if e.name != f"{__package__}.{m}":
                raise


def load_dataset(cfg) -> FederatedDataset:
    """cfg: config.DataConfig."""
    _import_all()
    if cfg.dataset not in _BUILDERS:
        raise PFedMoAPError(f"data.dataset = {cfg.dataset!r}: unknown; expected one of {available()}")
    return _BUILDERS[cfg.dataset](cfg)
