"""What a method declares about itself, readable without its heavy dependencies (no torch).

A method package (`algorithms/<package>/__init__.py`) registers one `Manifest` per method it holds;
its implementation (`method.py`: the Method class, its server and client parts) is imported only
when a run builds it (`Manifest.load()`). Everything that needs to know the methods without running
one (config validation, help texts, the quick-start, tables, reports) reads the manifests.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import PFedMoAPError


def _resolve(ref):
    """`"package.module:attribute"` -> the attribute (imported now); anything else as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DataNeeds:
    """The image features a method's clients get (data/features.py computes them; build.py reads this).

    Every method gets the pooled features (ClientData.train_x / test_x, one vector per image)."""
    # also the patch features (ClientData.train_dense / test_dense, (n, M, D)); then no augmented views
    dense: bool = False
    # also the images themselves, preprocessed for the image tower (ClientData.images, a
    # data.features.ClientImages): for a method that trains inside the image tower, where frozen
    # features cannot serve; its training views follow data.augment as the features' do
    images: bool = False


@dataclass(frozen=True)
class Figure:
    """A figure a method draws of its own runs (e.g. pFedMoAP's experts and gating weights)."""
    name: str               # file stem of the figure
    description: str        # one line: what it shows
    draw: object            # "package.module:function" (imported when drawn), or the function

    def load(self):
        return _resolve(self.draw)


@dataclass(frozen=True)
class Manifest:
    """A registered method (see docs/methods.md)."""
    name: str                           # the config's `algorithm` value
    implementation: object              # "package.module:Class" of its Method subclass, or the class itself
    label: str = ""                     # its name in reports and figures ("" = name)
    order: int = 1000                   # report order (the README's order of methods), then name
    quickstart: bool = False            # `pfedmoap run` without a config runs it
    section: str = ""                   # TOML section of its options ([section]), "" = none
    options: type | None = None         # dataclass of its options (only its own keys); may define validate()
    data: DataNeeds = DataNeeds()       # the image features its clients need
    figures: tuple[Figure, ...] = ()    # figures of its own, drawn by `pfedmoap report`
    rounds: int = 0                     # a fixed number of rounds (a frozen model evaluated once: 1); 0 = `rounds`
    default: bool = False               # the method of a config that names no algorithm (one method only)
    summary: str = ""                   # one line for help texts

    def __post_init__(self):
        if not self.name:
            raise ValueError("a method needs a name")
        if bool(self.section) != (self.options is not None):
            raise ValueError(f"method {self.name!r}: give both a section and an options class, or neither")
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def load(self) -> type:
        """The Method class (imports the implementation, and with it torch)."""
        return _resolve(self.implementation)

    def check(self, cfg) -> None:
        """What the method's needs require of the shared sections (config.validate calls it)."""
        d = cfg.data
        if self.data.dense and d.augment_mode != "none":
            what = (f"data.augment_views = {d.augment_views}" if d.augment_mode == "views"
                    else f"data.augment = {d.augment!r}")
            raise PFedMoAPError(f"{what}: algorithm = {self.name!r} uses dense (patch) image features, which "
                                f"are not computed for augmented views; set data.augment = 'none' and "
                                f"data.augment_views = 0")

        if self.data.images and self.data.dense:
            raise PFedMoAPError(f"algorithm = {self.name!r}: its manifest asks for both images and dense "
                                f"features; only one of them is supported")

    def rounds_for(self, cfg) -> int:
        """The rounds a run of this method with config `cfg` has."""
        return self.rounds or cfg.rounds
