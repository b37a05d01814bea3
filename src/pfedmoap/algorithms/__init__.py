"""Method registry: every method declares a `Manifest` (manifest.py) and registers it here.

A method package is a subpackage `algorithms/<package>/`: its `__init__.py` declares the methods'
manifests and options (no torch: it is imported to validate a config or list the methods), its
`method.py` implements them (imported when a run builds one: `Manifest.load()`, `get(name)`).
Every subpackage is imported when this package is, so a new method needs no edit here; a method
defined elsewhere (a test, a user's package) calls `register` the same way.

Registering also gives config the method's options section (config knows no method).
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import config
from ..errors import PFedMoAPError
from .manifest import DataNeeds, Figure, Manifest  # noqa: F401

_REGISTRY: dict[str, Manifest] = {}


def register(m: Manifest) -> Manifest:
    if m.default and any(o.default for o in _REGISTRY.values() if o.name != m.name):
        raise ValueError(f"method {m.name!r}: another method is already the default")
    config.register_method(m.name, m.section, m.options, m.default, m.check)
    _REGISTRY[m.name] = m
    return m


def unregister(name: str) -> None:
    """Remove a method (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)
    config.unregister_method(name)


def manifests() -> list[Manifest]:
    """Every registered method, in report order (the README's)."""
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def names() -> list[str]:
    return sorted(_REGISTRY)


def manifest(name: str) -> Manifest:
    if name not in _REGISTRY:
        raise PFedMoAPError(f"algorithm = {name!r}: expected one of {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str) -> type:
    """The Method class of `name` (imports its implementation)."""
    return manifest(name).load()


for _m in pkgutil.iter_modules(__path__):
    if _m.ispkg:
        importlib.import_module(f"{__name__}.{_m.name}")
