"""What the reports know of a method: its label, its place in report order, its colour and its own
figures, all read from the method registry (each method's manifest). No method is named here; a
run of a method that is not installed is reported under its name, after the known ones."""
from __future__ import annotations

from .. import algorithms       # the manifests only: no torch (docs/methods.md)


def _manifests() -> dict:
    return {m.name: m for m in algorithms.manifests()}      # in report order


def label(name: str) -> str:
    """The method's label for figures (its manifest's), or the name of an unknown method."""
    m = _manifests().get(name)
    return m.label if m is not None else name


def order(name: str) -> tuple:
    """Sort key: the manifests' report order (the README's), unknown methods last by name."""
    known = list(_manifests())
    return (known.index(name) if name in known else len(known), name)


# Colour-blind-safe, distinct qualitative colours (matplotlib's tab10 without its grey, then the
# light half of tab20): one per method by its place in report order, the same in every figure.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
           "#dbdb8d", "#9edae5")


def colour(name: str) -> str:
    return PALETTE[order(name)[0] % len(PALETTE)] if name in _manifests() else "#7f7f7f"


def figures(name: str) -> tuple:
    """The figure specs the method draws itself (its manifest's `figures`; none if unknown)."""
    m = _manifests().get(name)
    return tuple(m.figures) if m is not None else ()


def draw_function(spec):
    """A figure spec's draw function, imported only now: `draw(run, title)` -> a matplotlib
    Figure, or a sentence saying why the figure would show nothing for this run."""
    return spec.load()
