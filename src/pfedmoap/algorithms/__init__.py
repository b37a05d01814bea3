"""Method registry (as open_clip's model registry): a method is one module in this package that
registers one `Method` subclass with `@register`; `get(name)` is the factory's lookup.

Every module of the package is imported on the first lookup, so a new method needs no edit here.
A method defined elsewhere (a test, a user's package) registers itself the same way on import.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import PFedMoAPError
from .base import (Array, Arrays, Broadcast, ClientData, ClientPart, EvalResult, Log, Method,  # noqa: F401
                   PerClient, PromptState, ServerPart, Setup, fedavg, sample_participants)

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a method needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in pkgutil.iter_modules(__path__):
            if m.name != "base":
                importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    _load()
    if name not in _REGISTRY:
        raise PFedMoAPError(f"algorithm = {name!r}: expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
