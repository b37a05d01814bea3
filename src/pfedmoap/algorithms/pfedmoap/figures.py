"""pFedMoAP's own figures, drawn by `pfedmoap report --plot` through the method's manifest
(`figures` in __init__.py): which clients served as whose experts (`/rounds/experts`) and how the gating network
weighs the local prompt against them (`/rounds/gate_weight`).

A draw function takes a run read back (`pfedmoap.analysis.Run`) and the title naming it (method,
variant, seed and setting), and returns a matplotlib Figure, or a sentence saying why the figure
would show nothing at this run's settings (it is then not drawn and the report says why).
numpy only at import; matplotlib is imported when a figure is drawn.
"""
from __future__ import annotations

import warnings

import numpy as np

MAX_GATING_LINES = 8   # local + 7 expert ranks drawn one by one; the rest of K as their mean
UNIFORM_TOLERANCE = 0.05   # mean weights all within ±5 % of 1/K: the gating figure would be flat


def expert_counts(run) -> np.ndarray:
    """(N, N) counts: [i, j] = rounds in which client j was one of client i's non-local experts."""
    experts = run.rounds["experts"]
    n = int(run.attrs["n_clients"])
    counts = np.zeros((n, n), np.int64)
    _, client, _ = np.nonzero(experts >= 0)
    np.add.at(counts, (client, experts[experts >= 0]), 1)
    return counts


def mean_gate_weight(run) -> np.ndarray:
    """(R, K) mean over clients of the gating weight per expert rank, local first (NaN: none)."""
    with warnings.catch_warnings():      # a round without experts is all NaN and stays so
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(run.rounds["gate_weight"], axis=1)


def expert_figure(run, title: str):
    """Heatmap of `expert_counts` on a fixed 0..rounds colour scale with a colorbar; counts in the
    cells up to 12 clients, ticks thinned past 16. Not drawn when every off-diagonal count is the
    same (K = N: every client's experts are all the others, in every round): the map would be flat."""
    if "experts" not in run.rounds:
        return "the run logged no experts"
    counts = expert_counts(run)
    n = len(counts)
    off = counts[~np.eye(n, dtype=bool)]
    if off.size == 0 or off.max() == 0:
        return "no client received an expert"
    if off.min() == off.max():
        k = run.rounds["experts"].shape[-1] + 1
        return (f"every client had every other client as an expert in {off[0]} of {run.n_done} rounds "
                f"(K = {k}, N = {n}): the map would be flat")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    top = max(run.n_done, int(counts.max()), 1)
    image = ax.imshow(counts, cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, label="rounds selected")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
    if n <= 16:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    if n <= 12:
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value < top / 2 else "black")
    ax.set_title(f"expert selection: {title}", fontsize="medium")
    ax.set(xlabel="expert client", ylabel="client")
    return fig


def gating_figure(run, title: str):
    """Mean gating weight per expert rank over the rounds with experts (local first, drawn thicker),
    with the uniform weight 1/K dotted; past MAX_GATING_LINES ranks the rest as their mean. Not
    drawn when every mean weight lies within ±UNIFORM_TOLERANCE (relative) of 1/K: the lines
    would lie on top of each other (the quick-start's 5 short rounds: 0.097 to 0.103 at K = 10)."""
    if "gate_weight" not in run.rounds:
        return "the run logged no gating weights"
    weights = mean_gate_weight(run)
    k = weights.shape[1]
    x = np.arange(1, len(weights) + 1)
    drawn = np.isfinite(weights[:, 1:]).any(axis=1) if k > 1 else np.isfinite(weights).any(axis=1)
    if not drawn.any():
        return "no round with experts to weigh"
    x, weights = x[drawn], weights[drawn]
    spread = float(np.nanmax(np.abs(k * weights - 1)))
    if k > 1 and spread <= UNIFORM_TOLERANCE:
        return (f"every mean gating weight stays within ±{spread:.1%} of uniform 1/K = 1/{k} "
                f"(rounds {x[0]}-{x[-1]}): the lines would coincide")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    shown = k if k <= MAX_GATING_LINES else MAX_GATING_LINES - 1
    for j in range(shown):
        ax.plot(x, weights[:, j], marker="o", markersize=3,
                label="local" if j == 0 else f"expert {j}", linewidth=2.5 if j == 0 else 1)
    if shown < k:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rest = np.nanmean(weights[:, shown:], axis=1)
        ax.plot(x, rest, marker="o", markersize=3, color="gray", label=f"experts {shown}-{k - 1} (mean)")
    if k > 1:
        ax.axhline(1 / k, linestyle=":", color="black", linewidth=1, label=f"uniform 1/K = 1/{k}")
    top = float(np.nanmax(weights))
    ax.set(xlabel="round", ylabel="mean gating weight (over clients)", ylim=(0, min(1.0, 1.15 * top)),
           xlim=(x[0] - 0.5, x[-1] + 0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_title(f"gating: {title}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig
