"""Algorithm registry: a method is one module that registers one `Algorithm` subclass."""
from __future__ import annotations

import importlib

from ..errors import PFedMoAPError
from .base import Algorithm, ClientData, ClientState, EvalResult  # noqa: F401

_REGISTRY: dict[str, type[Algorithm]] = {}
_MODULES = ("zeroshot", "coop", "pfedmoap")


def register(cls: type[Algorithm]) -> type[Algorithm]:
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Algorithm]:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")
    if name not in _REGISTRY:
        raise PFedMoAPError(f"algorithm = {name!r}: expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
