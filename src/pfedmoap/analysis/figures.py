"""Figures (PNG, matplotlib without pyplot): per setting the mean accuracy per round and the final
per-client accuracies, one colour per method in report order; per run, the figures its method
draws itself (its manifest's `figures`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import methods
from .runs import Run, is_number, slug
from .summary import Group, group_runs

LINESTYLES = ("-", "--", ":", "-.")   # several rows of one method (variants, runs not complete)


def setting(run: Run) -> str:
    """The experimental setting, for figure titles: data set, split with its parameter (Dirichlet
    β, classes per client, shots) and clients (with the fraction sampled per round when < 1), read
    from the run's resolved config (the `config` attribute of results.h5), falling back to the
    file's attributes. E.g. `cifar100, dirichlet β=0.5, 100 clients (10% per round)`."""
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    train = run.config.get("train") if isinstance(run.config.get("train"), dict) else {}
    dataset = str(data.get("dataset", run.attrs.get("dataset", "?")))
    partition = str(data.get("partition", run.attrs.get("partition", "?")))
    split = [partition]
    beta, shots = data.get("beta"), data.get("shots")
    per_domain = data.get("clients_per_domain", 1)
    if partition.startswith("dirichlet") and is_number(beta):
        split[0] += f" β={beta:g}"
    elif partition == "pathological" and is_number(data.get("classes_per_client")) \
            and data["classes_per_client"] > 0:
        split[0] += f" {data['classes_per_client']} classes/client"
    elif partition == "domain" and is_number(per_domain) and per_domain > 1:
        split[0] += f" {per_domain} clients/domain" + (f" β={beta:g}" if is_number(beta) else "")
    if is_number(shots) and shots > 0:
        split.append(f"{shots} shots")
    n = run.attrs.get("n_clients", data.get("n_clients", "?"))
    clients = f"{n} clients"
    frac = train.get("frac")
    if is_number(frac) and 0 < frac < 1:
        clients += f" ({frac:.0%} per round)"
    return ", ".join([dataset] + split + [clients])


def run_label(run: Run, variant: str = "") -> str:
    """`<label> [variant], seed 0`: which run a per-run figure shows (the label: the manifest's)."""
    return " ".join([methods.label(run.algorithm)] + ([variant] if variant else [])) + f", seed {run.seed}"


def plot_runs(runs: list[Run], out_dir: str | Path, skipped: list[str] | None = None) -> list[Path]:
    """Write PNG figures into out_dir and return their paths: per setting (data set, split,
    clients), the mean accuracy per round (band: ± std over seeds) and the final per-client
    accuracies (a box per row, clients of all its seeds pooled); per run, the figures of its
    method's manifest. A method figure that would show nothing at the run's settings is not drawn;
    `skipped` (if given) receives one line per such figure saying why.
    Titles carry the setting (`setting`), not the run directory's name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [g for g in group_runs(runs) if g.runs[0].readable and g.runs[0].n_done > 0]
    written: list[Path] = []

    def save(fig, stem: str) -> None:
        path = out_dir / f"{slug(stem)}.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    by_setting: dict[str, list[Group]] = {}
    for group in groups:
        by_setting.setdefault(setting(group.runs[0]), []).append(group)
    shared = {}  # (dataset, partition) -> number of settings with it: several get longer names
    for members in by_setting.values():
        shared[members[0].label[1:]] = shared.get(members[0].label[1:], 0) + 1
    for title, members in by_setting.items():
        dataset, partition = members[0].label[1:]
        suffix = f"{dataset}_{partition}"
        if shared[(dataset, partition)] > 1:
            suffix += "_" + title.split(", ", 1)[1].replace("β=", "beta")
        save(accuracy_figure(members, title), f"accuracy_{suffix}")
        save(client_accuracy_figure(members, title), f"client_accuracy_{suffix}")

    stems: set[str] = set()
    for group in groups:
        specs = methods.figures(group.runs[0].algorithm)
        for run in group.runs if specs else ():
            base = stem = slug(run.name)
            copy = 1
            while stem in stems:  # sweeps often repeat a leaf name (a/seed0, b/seed0)
                copy += 1
                stem = f"{base}-{copy}"
            stems.add(stem)
            title = f"{run_label(run, group.variant)}\n{setting(run)}"
            for spec in specs:
                fig = methods.draw_function(spec)(run, title)
                name = f"{spec.name}_{stem}"
                if isinstance(fig, str):
                    if skipped is not None:
                        skipped.append(f"{slug(name)}.png not drawn: {fig}")
                else:
                    save(fig, name)
    return written


def accuracy_figure(groups: list[Group], title: str = ""):
    """Mean client accuracy (%) per round, one line per group in its method's colour, the band
    ± std over its seeds (named so in the legend); a one-round run (a frozen model evaluated once) as a dashed level
    across the axis. Integer round ticks; the legend outside the axes."""
    from matplotlib.legend_handler import HandlerTuple

    fig, ax = new_figure((8.5, 4.5))
    handles, labels = [], []
    partial_rounds = False
    n_max = max([g.runs[0].n_done for g in groups] + [1])
    alpha = 0.2 if len(groups) <= 4 else 0.1        # many overlapping bands: lighter
    for group, colour, style in _styles(groups):
        curves = 100 * np.stack([r.accuracy_curve() for r in group.runs])    # fully evaluated rounds
        mean = curves.mean(axis=0)
        n = len(group.runs)
        std = curves.std(axis=0, ddof=1) if n > 1 else None
        if len(mean) == 1 and group.runs[0].n_planned == 1:   # one evaluation: a level, not a point
            line = ax.axhline(mean[0], linestyle="--", color=colour)
            band = None if std is None else ax.axhspan(mean[0] - std[0], mean[0] + std[0],
                                                      color=colour, alpha=alpha)
        else:  # rounds not evaluated (run.eval_every) are skipped, not drawn as gaps
            x = np.arange(1, len(mean) + 1)
            ok = np.isfinite(mean)
            (line,) = ax.plot(x[ok], mean[ok], marker="o", markersize=3, color=colour, linestyle=style)
            band = None if std is None else ax.fill_between(x[ok], (mean - std)[ok], (mean + std)[ok],
                                                            color=colour, alpha=alpha)
            # rounds that evaluated only their participants (run.eval_clients): hollow markers
            partial = 100 * np.stack([r.accuracy_curve(full_only=False) for r in group.runs]).mean(axis=0)
            some = ~ok & np.isfinite(partial)
            if some.any():
                ax.plot(x[some], partial[some], linestyle="none", marker="o", markersize=4,
                        markerfacecolor="none", color=colour)
                partial_rounds = True
        handles.append(line if band is None else (band, line))
        labels.append(_legend(group))
    if partial_rounds:
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", color="gray"))
        labels.append("participants only (run.eval_clients)")
    ax.set(xlabel="round", ylabel="mean client accuracy (%)", xlim=(0.5, n_max + 0.5),
           title=title)
    integer_ticks(ax.xaxis)
    ax.legend(handles, labels, fontsize="small", handler_map={tuple: HandlerTuple(ndivide=1)},
              loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def client_accuracy_figure(groups: list[Group], title: str = ""):
    """The final accuracy (%) of every client, a box per group in its method's colour: the clients
    of all the group's seeds pooled into one box (the tick says how many values it holds)."""
    fig, ax = new_figure((max(5, 1.2 * len(groups) + 2), 4.8))
    finals = [100 * np.concatenate([r.rounds["accuracy"][-1] for r in g.runs]) for g in groups]
    boxes = ax.boxplot([f[np.isfinite(f)] for f in finals], patch_artist=True,
                       medianprops={"color": "black"})
    for patch, (_, colour, _) in zip(boxes["boxes"], _styles(groups)):
        patch.set(facecolor=colour, alpha=0.6)
    ax.set_xticks(range(1, len(groups) + 1), [_box_label(g, f) for g, f in zip(groups, finals)],
                  fontsize="small")
    ax.set(ylabel="final accuracy per client (%)", title=title)
    return fig


def new_figure(size):
    from matplotlib.figure import Figure  # no pyplot: no global backend or state is touched

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _styles(groups: list[Group]):
    """(group, colour, line style): the method's colour; its second, third ... row (a variant, a
    run not complete) another line style."""
    seen: dict[str, int] = {}
    for group in groups:
        algorithm = group.runs[0].algorithm
        k = seen.get(algorithm, 0)
        seen[algorithm] = k + 1
        yield group, methods.colour(algorithm), LINESTYLES[k % len(LINESTYLES)]


def _name(group: Group) -> str:
    return " ".join([methods.label(group.runs[0].algorithm)] + ([group.variant] if group.variant else []))


def _legend(group: Group) -> str:
    """`<label> [variant] (mean ± std over 3 seeds)`, or `(seed 0)` for one run."""
    run = group.runs[0]
    if len(group.runs) > 1:
        return f"{_name(group)} (mean ± std over {len(group.runs)} seeds)"
    return f"{_name(group)} (seed {run.seed}" + (f", {run.status})" if run.status != "complete" else ")")


def _box_label(group: Group, finals: np.ndarray) -> str:
    """`<label> (10 clients × 3 seeds)`: what the box pools, not a statistic over seeds."""
    n_seeds = len(group.runs)
    n_clients = len(finals) // n_seeds
    if n_seeds > 1:
        return f"{_name(group)}\n({n_clients} clients × {n_seeds} seeds)"
    return f"{_name(group)}\n({n_clients} clients, seed {group.runs[0].seed})"
