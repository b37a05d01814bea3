"""Reading runs back: summary tables over seeds, curves and comparison figures.

Library code: nothing here parses arguments or prints; `report_main` returns the text the CLI
prints.
The headline metric (the paper §4.1, docs/hdf5-layout.md) is the unweighted mean over clients of the per-client accuracy,
at the last round and over the last 5 rounds. Accuracies in the file are fractions; the terminal
and Markdown tables and the figures show percent, the CSV keeps the file's units.
"""
from __future__ import annotations

import csv
import io
import json
import re
import tomllib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .store import READABLE_RESULTS, SCHEMA_VERSION, read_results
from .errors import PFedMoAPError

FORMATS = ("table", "csv", "markdown")
LAST_K = 5
ALGORITHM_ORDER = ("zeroshot", "local", "promptfl", "fedprox", "pfedmoap")
SEED_KEYS = frozenset({"seed", "out"})  # config keys that may differ between the seeds of one group


@dataclass(frozen=True)
class Run:
    """One run read back. `rounds` arrays are cut to the rows actually written (`n_done`)."""
    path: Path
    attrs: dict
    config: dict
    partition: dict
    rounds: dict
    status: str  # complete | running | stopped | incomplete | schema N unsupported

    @property
    def name(self) -> str:
        """The run directory's name, used in figure names and titles."""
        return self.path.resolve().parent.name

    @property
    def algorithm(self) -> str:
        return str(self.attrs.get("algorithm", "?"))

    @property
    def seed(self) -> int | None:
        return self.attrs.get("seed")

    @property
    def n_done(self) -> int:
        return len(self.rounds.get("accuracy", ()))

    @property
    def n_planned(self) -> int:
        return 1 if self.algorithm == "zeroshot" else int(self.attrs.get("n_rounds", 0))

    @property
    def readable(self) -> bool:
        return self.attrs.get("schema_version") in READABLE_RESULTS

    def accuracy_curve(self, full_only: bool = True) -> np.ndarray:
        """(R,) unweighted mean over clients of the accuracy, per round. A round that evaluated only
        some clients or none (run.eval_every, run.eval_clients: /rounds/evaluated) is NaN, or with
        full_only=False the mean over the clients it evaluated (NaN where none)."""
        curve = _nanmean(self.rounds["accuracy"], axis=1)
        return np.where(self.full_rounds(), curve, np.nan) if full_only else curve

    def full_rounds(self) -> np.ndarray:
        """(R,) bool: the rounds that evaluated every client (all of them before schema 3)."""
        evaluated = self.rounds.get("evaluated")
        if not isinstance(evaluated, np.ndarray) or evaluated.ndim != 2:
            return np.ones(self.n_done, bool)
        return evaluated[:self.n_done].all(axis=1)


def load_run(path: str | Path) -> Run:
    """Read one run (its directory or its results.h5). A path that is not a run raises
    PFedMoAPError; an incomplete run or one of another schema version loads with that status."""
    data = read_results(path)
    attrs = data["attrs"]
    file = Path(path) / "results.h5" if Path(path).is_dir() else Path(path)
    if attrs.get("schema_version") not in READABLE_RESULTS:
        status = f"schema {attrs.get('schema_version')} unsupported"
        return Run(file, attrs, _parse_config(attrs.get("config")), {}, {}, status)
    rounds = data["rounds"]
    per_round = {k: v for k, v in rounds.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
    if int(attrs["rounds_done"]) > 0 and "accuracy" not in per_round:
        raise PFedMoAPError(f"{file}: rounds_done is {attrs['rounds_done']} but there is no "
                            "/rounds/accuracy; expected a pfedmoap results.h5 "
                            "(docs/hdf5-layout.md)")
    # A run being written may have resized some data sets for the next round and not others.
    n = min([int(attrs["rounds_done"])] + [len(v) for v in per_round.values()])
    rounds = {k: (v[:n] if k in per_round else v) for k, v in rounds.items()}
    rounds.setdefault("accuracy", np.zeros((0, int(attrs["n_clients"])), np.float32))
    run = Run(file, attrs, _parse_config(attrs["config"]), data["partition"], rounds,
              str(attrs["status"]))
    if run.status == "complete" and run.n_done < run.n_planned:
        return replace(run, status="incomplete")
    return run


class Stat(NamedTuple):
    """Mean and sample standard deviation (ddof=1) over a group's runs; std is None for one run."""
    mean: float
    std: float | None

    @classmethod
    def of(cls, values) -> Stat | None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return None
        std = float(np.std(values, ddof=1)) if values.size > 1 else None
        return cls(float(np.mean(values)), std)


@dataclass
class Row:
    """One line of the report: a run, or the seeds of one configuration."""
    algorithm: str
    dataset: str
    partition: str
    variant: str  # config keys that set this row apart from others with the same three labels
    seeds: tuple
    status: str
    rounds_done: int
    n_rounds: int
    paths: tuple[Path, ...]
    acc_last: Stat | None = None
    acc_last5: Stat | None = None
    best_round: int | None = None  # 1-based round with the best seed-mean accuracy
    best_acc: Stat | None = None
    macro_f1: Stat | None = None
    bytes_per_round: Stat | None = None
    note: str = ""
    dp_epsilon: Stat | None = None   # DP runs: the (client-level) ε spent by the last round written
    dp_delta: float | None = None
    dp_neighbours: str | None = None  # the neighbouring relation the ε assumes (attribute dp_neighbours)


@dataclass
class Group:
    """Runs reported as one row: the seeds of one complete configuration, or a single run."""
    runs: list[Run] = field(default_factory=list)
    variant: str = ""

    @property
    def label(self) -> tuple[str, str, str]:
        first = self.runs[0]
        return (first.algorithm, str(first.attrs.get("dataset", "?")),
                str(first.attrs.get("partition", "?")))


def group_runs(runs: list[Run]) -> list[Group]:
    """Complete runs whose configs are equal apart from seed and output dir form one group; any
    other run stands alone. Sorted by data set, partition, then algorithm (baselines first)."""
    groups: dict[str, Group] = {}
    seen: set[Path] = set()
    for run in runs:
        where = run.path.resolve()
        if where in seen:  # the same run named twice
            continue
        seen.add(where)
        if run.status == "complete":
            key = json.dumps([run.algorithm, run.attrs.get("dataset"), run.attrs.get("partition"),
                              run.n_done, _without_seed(run.config)], sort_keys=True, default=str)
        else:
            key = str(where)
        groups.setdefault(key, Group()).runs.append(run)
    out = list(groups.values())
    _name_variants(out)

    def order(g: Group):
        algo, dataset, partition = g.label
        rank = ALGORITHM_ORDER.index(algo) if algo in ALGORITHM_ORDER else len(ALGORITHM_ORDER)
        return (dataset, partition, rank, algo, g.variant, str(g.runs[0].seed))
    return sorted(out, key=order)


def summarize(runs: list[Run]) -> list[Row]:
    """One row per group of `group_runs`, with the headline metrics as mean ± std over seeds."""
    return [_summarize_group(group) for group in group_runs(runs)]


def _summarize_group(group: Group) -> Row:
    runs = group.runs
    first = runs[0]
    row = Row(*group.label, variant=group.variant,
              seeds=tuple(sorted(r.seed for r in runs)), status=first.status,
              rounds_done=first.n_done, n_rounds=first.n_planned, paths=tuple(r.path for r in runs))
    if not first.readable:
        row.n_rounds = 0  # sizes of another schema are not interpreted
        row.note = (f"{first.path}: schema_version {first.attrs.get('schema_version')}, this "
                    f"pfedmoap reads {', '.join(map(str, READABLE_RESULTS))}: listed, not summarised")
        return row
    if first.status != "complete":
        row.note = (f"{first.path}: {first.status}, {first.n_done} of {first.n_planned} "
                    "rounds written")
    if first.n_done == 0:
        return row
    # Fully evaluated rounds only (every round by default; the last round always): "last" is the last
    # of them (the last round of a finished run), "last 5" the mean of those among the last 5 rounds.
    curves = np.stack([r.accuracy_curve() for r in runs])
    row.acc_last = Stat.of([c[np.isfinite(c)][-1] if np.isfinite(c).any() else np.nan for c in curves])
    row.acc_last5 = Stat.of(_nanmean(curves[:, -LAST_K:], axis=1))
    mean_curve = curves.mean(axis=0)
    if np.isfinite(mean_curve).any():
        best = int(np.nanargmax(mean_curve))
        row.best_round, row.best_acc = best + 1, Stat.of(curves[:, best])
    if all("macro_f1" in r.rounds for r in runs):
        row.macro_f1 = Stat.of([_nanmean(r.rounds["macro_f1"][-1]) for r in runs])
    if all("bytes_up" in r.rounds and "bytes_down" in r.rounds for r in runs):
        row.bytes_per_round = Stat.of([
            (r.rounds["bytes_up"].sum(axis=1) + r.rounds["bytes_down"].sum(axis=1)).mean()
            for r in runs])
    epsilons = [dp_epsilon(r) for r in runs]
    if all(e is not None for e in epsilons):
        row.dp_epsilon, row.dp_delta = Stat.of(epsilons), float(first.attrs.get("dp_delta", np.nan))
        row.dp_neighbours = dp_neighbours(first)
    return row


def dp_neighbours(run: Run) -> str:
    """The neighbouring relation of a DP run's ε (files before issue 21 assumed the same)."""
    return str(run.attrs.get("dp_neighbours", "add/remove one client (client-level)"))


def dp_epsilon(run: Run) -> float | None:
    """The ε a DP run has spent by its last written round (`/rounds/dp_epsilon`; before any round,
    the planned total, attribute `dp_epsilon`); inf for clipping without noise; None without DP."""
    eps = run.rounds.get("dp_epsilon")
    value = eps[-1] if isinstance(eps, np.ndarray) and eps.ndim == 1 and len(eps) else \
        run.attrs.get("dp_epsilon")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(value) else value


# ---------------------------------------------------------------------------------------- tables

_COLUMNS = ("algorithm", "dataset", "partition", "variant", "seeds", "status", "rounds",
            "acc last (%)", f"acc last {LAST_K} (%)", "best round", "best acc (%)",
            "macro-F1 (%)", "bytes/round")


def format_table(rows: list[Row], fmt: str = "table") -> str:
    """`table` (aligned text for a terminal), `markdown`, or `csv` (file units, one column per
    mean and std, no notes). Table and Markdown end with one note per run that is incomplete,
    still running or of another schema version."""
    _check_format(fmt)
    if fmt == "csv":
        return _csv(rows)
    cells = [_display_cells(row) for row in rows]
    columns = list(_COLUMNS)
    if not any(c[3] for c in cells):  # no variants: drop the column
        columns.pop(3)
        cells = [c[:3] + c[4:] for c in cells]
    if any(row.dp_epsilon is not None for row in rows):     # DP runs: the privacy spent
        columns.append("DP ε (δ)")
        cells = [c + [_dp_cell(row)] for c, row in zip(cells, rows)]
    notes = [row.note for row in rows if row.note]
    relations = sorted({row.dp_neighbours for row in rows if row.dp_neighbours})
    if relations:
        notes.append(f"DP ε: neighbours {' / '.join(relations)}; an upper bound (RDP accountant), see docs/privacy.md")
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cell) + " |" for cell in cells]
        lines += ([""] + [f"- {note}" for note in notes]) if notes else []
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
    numeric = set(range(columns.index("rounds"), len(columns)))

    def line(values):
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    lines = [line(columns), line(["-" * w for w in widths])] + [line(c) for c in cells]
    lines += ([""] + [f"note: {note}" for note in notes]) if notes else []
    return "\n".join(lines) + "\n"


def _display_cells(row: Row) -> list[str]:
    return [row.algorithm, row.dataset, row.partition, row.variant,
            ",".join(str(s) for s in row.seeds), row.status,
            f"{row.rounds_done}/{row.n_rounds}" if row.n_rounds else "",
            _pm(row.acc_last, 100), _pm(row.acc_last5, 100),
            "" if row.best_round is None else str(row.best_round), _pm(row.best_acc, 100),
            _pm(row.macro_f1, 100), _bytes(row.bytes_per_round)]


def _dp_cell(row: Row) -> str:
    stat = row.dp_epsilon
    if stat is None:
        return ""
    eps = "∞" if np.isinf(stat.mean) else _pm(stat)
    return f"{eps} ({row.dp_delta:g})"


def _pm(stat: Stat | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None or not np.isfinite(stat.mean):
        return ""
    text = f"{stat.mean * scale:.{digits}f}"
    return text if stat.std is None else f"{text} ± {stat.std * scale:.{digits}f}"


def _bytes(stat: Stat | None) -> str:
    if stat is None:
        return ""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if stat.mean >= size:
            scaled = Stat(stat.mean / size, None if stat.std is None else stat.std / size)
            return f"{_pm(scaled)} {unit}"
    return _pm(stat, digits=0) + " B"


def _csv(rows: list[Row]) -> str:
    metrics = ("acc_last", "acc_last5", "best_acc", "macro_f1", "bytes_per_round")
    header = ["algorithm", "dataset", "partition", "variant", "seeds", "n_runs", "status",
              "rounds_done", "n_rounds", "best_round"]
    header += [f"{m}_{part}" for m in metrics for part in ("mean", "std")]
    header += ["dp_epsilon_mean", "dp_epsilon_std", "dp_delta", "runs"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = [row.algorithm, row.dataset, row.partition, row.variant,
                  " ".join(str(s) for s in row.seeds), len(row.paths), row.status, row.rounds_done,
                  row.n_rounds, "" if row.best_round is None else row.best_round]
        for metric in metrics:
            stat = getattr(row, metric)
            values += ["" if stat is None else repr(stat.mean),
                       "" if stat is None or stat.std is None else repr(stat.std)]
        eps = row.dp_epsilon
        values += ["" if eps is None else repr(eps.mean), "" if eps is None or eps.std is None else repr(eps.std),
                   "" if eps is None else repr(row.dp_delta)]
        writer.writerow(values + [";".join(str(p) for p in row.paths)])
    return out.getvalue()


# --------------------------------------------------------------------------------------- figures

MAX_GATING_LINES = 8  # local + 7 experts drawn one by one; the rest of K as their mean


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
    if partition.startswith("dirichlet") and _number(beta):
        split[0] += f" β={beta:g}"
    elif partition == "pathological" and _number(data.get("classes_per_client")) \
            and data["classes_per_client"] > 0:
        split[0] += f" {data['classes_per_client']} classes/client"
    elif partition == "domain" and _number(per_domain) and per_domain > 1:
        split[0] += f" {per_domain} clients/domain" + (f" β={beta:g}" if _number(beta) else "")
    if _number(shots) and shots > 0:
        split.append(f"{shots} shots")
    n = run.attrs.get("n_clients", data.get("n_clients", "?"))
    clients = f"{n} clients"
    frac = train.get("frac")
    if _number(frac) and 0 < frac < 1:
        clients += f" ({frac:.0%} per round)"
    return ", ".join([dataset] + split + [clients])


def run_label(run: Run, variant: str = "") -> str:
    """`pfedmoap [variant], seed 0`: which run a per-run figure shows."""
    return " ".join([run.algorithm] + ([variant] if variant else [])) + f", seed {run.seed}"


def plot_runs(runs: list[Run], out_dir: str | Path) -> list[Path]:
    """Write PNG figures into out_dir and return their paths: per setting (data set, split,
    clients), the mean accuracy per round (band: ± std over seeds) and the final per-client
    accuracies (a box per group, clients of all seeds pooled); per run that logged them (pfedmoap),
    the expert-selection counts (N x N) and the mean gating weight per expert rank over rounds.
    Titles carry the setting (`setting`), not the run directory's name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [g for g in group_runs(runs) if g.runs[0].readable and g.runs[0].n_done > 0]
    written: list[Path] = []

    def save(fig, stem: str) -> None:
        path = out_dir / f"{_slug(stem)}.png"
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
        for run in group.runs:
            if run.attrs.get("schema_version") == 1 and run.algorithm != "pfedmoap":
                continue  # schema 1 wrote experts/gate_weight for every method, filled for none
            if "experts" not in run.rounds and "gate_weight" not in run.rounds:
                continue  # schema 2: only methods that declare these logs write them
            base = stem = _slug(run.name)
            copy = 1
            while stem in stems:  # sweeps often repeat a leaf name (a/seed0, b/seed0)
                copy += 1
                stem = f"{base}-{copy}"
            stems.add(stem)
            if "experts" in run.rounds:
                save(expert_figure(run, group.variant), f"experts_{stem}")
            if "gate_weight" in run.rounds:
                save(gating_figure(run, group.variant), f"gating_{stem}")
    return written


def accuracy_figure(groups: list[Group], title: str = ""):
    """Mean client accuracy (%) per round, one line per group, the band ± std over its seeds
    (named so in the legend); zeroshot (one evaluation) as a dashed level. Integer round ticks."""
    from matplotlib.legend_handler import HandlerTuple

    fig, ax = _figure((7, 4.5))
    handles, labels = [], []
    partial_rounds = False
    n_max = max([g.runs[0].n_done for g in groups] + [1])
    for group in groups:
        curves = 100 * np.stack([r.accuracy_curve() for r in group.runs])    # fully evaluated rounds
        mean = curves.mean(axis=0)
        n = len(group.runs)
        std = curves.std(axis=0, ddof=1) if n > 1 else None
        name = " ".join([group.runs[0].algorithm] + ([group.variant] if group.variant else []))
        if len(mean) == 1:  # zeroshot: one evaluation, drawn across the whole axis
            line = ax.axhline(mean[0], linestyle="--", color="gray")
            band = None if std is None else ax.axhspan(mean[0] - std[0], mean[0] + std[0],
                                                      color="gray", alpha=0.15)
        else:  # rounds not evaluated (run.eval_every) are skipped, not drawn as gaps
            x = np.arange(1, len(mean) + 1)
            ok = np.isfinite(mean)
            (line,) = ax.plot(x[ok], mean[ok], marker="o", markersize=3)
            band = None if std is None else ax.fill_between(x[ok], (mean - std)[ok], (mean + std)[ok],
                                                            color=line.get_color(), alpha=0.2)
            # rounds that evaluated only their participants (run.eval_clients): hollow markers
            partial = 100 * np.stack([r.accuracy_curve(full_only=False) for r in group.runs]).mean(axis=0)
            some = ~ok & np.isfinite(partial)
            if some.any():
                ax.plot(x[some], partial[some], linestyle="none", marker="o", markersize=4,
                        markerfacecolor="none", color=line.get_color())
                partial_rounds = True
        handles.append(line if band is None else (band, line))
        labels.append(_legend(group))
    if partial_rounds:
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", color="gray"))
        labels.append("participants only (run.eval_clients)")
    ax.set(xlabel="round", ylabel="mean client accuracy (%)", xlim=(0.5, n_max + 0.5),
           title=title)
    _integer_ticks(ax.xaxis)
    ax.legend(handles, labels, fontsize="small", handler_map={tuple: HandlerTuple(ndivide=1)})
    return fig


def client_accuracy_figure(groups: list[Group], title: str = ""):
    """The final accuracy (%) of every client, a box per group (clients of all seeds pooled)."""
    fig, ax = _figure((max(5, 1.2 * len(groups) + 2), 4.5))
    finals = [100 * np.concatenate([r.rounds["accuracy"][-1] for r in g.runs]) for g in groups]
    ax.boxplot([f[np.isfinite(f)] for f in finals])
    ax.set_xticks(range(1, len(groups) + 1), [_legend(g) for g in groups], rotation=20,
                  ha="right")
    ax.set(ylabel="final accuracy per client (%)", title=title)
    return fig


def expert_figure(run: Run, variant: str = ""):
    """Heatmap of `expert_counts`: [i, j] = rounds in which client j was one of client i's
    experts, on a fixed 0..rounds colour scale with a colorbar. Cells carry their counts only
    while they are large enough to read (N <= 12); ticks are thinned past 16 clients. When every
    client gets every other one as an expert (K = N) the title says so."""
    from matplotlib.ticker import MaxNLocator

    counts = expert_counts(run)
    n = len(counts)
    fig, ax = _figure((5.5, 4.8))
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
    k = run.rounds["experts"].shape[-1] + 1 if run.rounds["experts"].ndim == 3 else 0
    lines = [f"expert selection: {run_label(run, variant)}", setting(run)]
    if n > 1 and k >= n:
        lines.append(f"K = N = {n}: each client's experts are all the other clients")
    ax.set_title("\n".join(lines), fontsize="medium")
    ax.set(xlabel="expert client", ylabel="client")
    return fig


def gating_figure(run: Run, variant: str = ""):
    """Mean gating weight per expert rank over rounds (local first, drawn thicker), y fixed to
    [0, 1] with the uniform weight 1/K dotted, so that 0.1000 ± 0.0002 reads as flat. Past
    MAX_GATING_LINES ranks the remaining ones are drawn as their mean."""
    weights = mean_gate_weight(run)
    k = weights.shape[1]
    fig, ax = _figure((7, 4.5))
    x = np.arange(1, len(weights) + 1)
    n_rounds = len(x)
    ok = np.isfinite(weights).any(axis=1)     # rounds without evaluation (run.eval_every) are skipped
    x, weights = x[ok], weights[ok]
    shown = k if k <= MAX_GATING_LINES else MAX_GATING_LINES - 1
    for j in range(shown):
        ax.plot(x, weights[:, j], marker="o", markersize=3,
                label="local" if j == 0 else f"expert {j}", linewidth=2.5 if j == 0 else 1)
    if shown < k:
        ax.plot(x, _nanmean(weights[:, shown:], axis=1), marker="o", markersize=3, color="gray",
                label=f"experts {shown}-{k - 1} (mean)")
    if k > 1:
        ax.axhline(1 / k, linestyle=":", color="black", linewidth=1, label=f"uniform 1/K = 1/{k}")
    ax.set(xlabel="round", ylabel="mean gating weight", ylim=(0, 1), xlim=(0.5, n_rounds + 0.5))
    ax.set_title(f"gating: {run_label(run, variant)}\n{setting(run)}", fontsize="medium")
    _integer_ticks(ax.xaxis)
    ax.legend(fontsize="small", ncols=2)
    return fig


def expert_counts(run: Run) -> np.ndarray:
    """(N, N) counts: [i, j] = rounds in which client j was one of client i's non-local experts."""
    experts = run.rounds["experts"]
    n = int(run.attrs["n_clients"])
    counts = np.zeros((n, n), np.int64)
    _, client, _ = np.nonzero(experts >= 0)
    np.add.at(counts, (client, experts[experts >= 0]), 1)
    return counts


def mean_gate_weight(run: Run) -> np.ndarray:
    """(R, K) mean over clients of the gating weight per expert rank, local first (NaN: none)."""
    return _nanmean(run.rounds["gate_weight"], axis=1)


def _figure(size):
    from matplotlib.figure import Figure  # no pyplot: no global backend or state is touched

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _legend(group: Group) -> str:
    """`pfedmoap [variant] (mean ± std over 3 seeds)`, or `(seed 0)` for one run."""
    run = group.runs[0]
    parts = [run.algorithm] + ([group.variant] if group.variant else [])
    if len(group.runs) > 1:
        parts.append(f"(mean ± std over {len(group.runs)} seeds)")
    else:
        parts.append(f"(seed {run.seed}" + (f", {run.status})" if run.status != "complete" else ")"))
    return " ".join(parts)


# ---------------------------------------------------------------------------------- paper tables

TABLE_FORMATS = FORMATS + ("latex",)


class Cell(NamedTuple):
    """One table cell: mean ± std over the complete runs of a (row, column) in fractions, how many
    runs that is, and whether seeds planned by the table are missing from it."""
    stat: Stat | None
    n: int
    short: bool


@dataclass
class PaperTable:
    """A table in the paper's layout: `cells[i]` is row i's cells (None: a row marked missing)."""
    title: str
    seeds: tuple
    rows: list[str]
    columns: list[str]
    cells: list[list[Cell] | None]
    notes: list[str]
    runs: list[Run]


def find_results(paths) -> list[Path]:
    """Every results.h5 under the given paths: a run directory, its results.h5, or any folder
    above runs (a table's OUT). A path with none is one PFedMoAPError."""
    files: dict[str, Path] = {}
    for given in paths:
        p = Path(given)
        if p.is_file():
            found = [p]
        elif (p / "results.h5").is_file():
            found = [p / "results.h5"]
        elif p.is_dir():
            found = sorted(p.rglob("results.h5"))
        else:
            raise PFedMoAPError(f"{given}: does not exist; expected a run directory or a folder of runs")
        if not found:
            raise PFedMoAPError(f"{given}: no results.h5 under it; expected a run directory or a folder of runs")
        for f in found:
            files.setdefault(str(f.absolute()), f)
    return list(files.values())


def _place(table, file: Path):
    """(row, column) of a run at OUT/<table>/<column>/<row>/seed<k>/results.h5, else None."""
    parts = file.absolute().parts
    if len(parts) < 6 or parts[-5] != table.name or not re.fullmatch(r"seed\d+", parts[-2]):
        return None
    row, column = table.row(parts[-3]), table.column(parts[-4])
    if row is None or column is None or row.missing:
        return None
    return row, column


def domain_accuracies(run: Run, domains) -> list[float]:
    """Per domain: the mean over the clients holding test images of that domain of their
    accuracy on them, at the last round written (NaN: no such client)."""
    names = [str(n) for n in run.partition.get("domain_names", [])]
    acc, counts = run.rounds["domain_accuracy"][-1], np.asarray(run.partition["test_domain_counts"])
    out = []
    for domain in domains:
        j = names.index(domain) if domain in names else -1
        has = counts[:, j] > 0 if j >= 0 else np.zeros(len(counts), bool)
        out.append(float(_nanmean(acc[has, j])) if has.any() else float("nan"))
    return out


def paper_table(table, paths) -> PaperTable:
    """Read the runs under `paths` that lie in `table`'s layout into the paper's layout: the
    table's rows; its data sets as columns, or (layout "domains") the config's domains + Avg.
    A cell is the mean ± std (ddof=1) over its complete runs (one per seed) of the mean client
    accuracy at the last round; runs not complete are named in a note and not counted."""
    placed: dict[tuple[str, str], list[Run]] = {}
    notes: list[str] = []
    outside = []
    for file in find_results(paths):
        spot = _place(table, file)
        if spot is None:     # other tables' runs under the same OUT are skipped without a word
            if len(file.absolute().parts) >= 5 and file.absolute().parts[-5] == table.name:
                outside.append(file)
            continue
        placed.setdefault((spot[0].key, spot[1].key), []).append(load_run(file))
    every = [r for runs in placed.values() for r in runs]
    domains = list(table.domains)
    if table.layout == "domains" and not domains:
        first = next((r for r in every if r.readable), None)
        domains = [str(n) for n in first.partition.get("domain_names", [])] if first else []
    columns = ([table.domain_label(d) for d in domains] + ["Avg"] if table.layout == "domains"
               else [c.name for c in table.columns])
    cells: list[list[Cell] | None] = []
    for row in table.rows:
        if row.missing:
            cells.append(None)
            notes.append(f"{row.name}: {row.missing} (no runs)")
            continue
        line: list[Cell] = []
        for column in table.columns:
            runs = sorted(placed.get((row.key, column.key), []), key=lambda r: (r.seed is None, r.seed))
            done = [r for r in runs if r.status == "complete" and r.readable and r.n_done > 0]
            for r in runs:
                if r not in done:
                    notes.append(f"{column.name} / {row.name}: {r.path}: {r.status}, {r.n_done} of "
                                 f"{r.n_planned} rounds: not counted")
            seeds = {r.seed for r in done}
            short = bool(set(table.seeds) - seeds)
            if short and done:
                notes.append(f"{column.name} / {row.name}: seeds {', '.join(str(s) for s in sorted(seeds))} "
                             f"of {', '.join(str(s) for s in table.seeds)} (*)")
            if table.layout == "domains":
                per_run = np.array([domain_accuracies(r, domains) + [float(r.accuracy_curve()[-1])]
                                    for r in done]).reshape(len(done), len(domains) + 1)
                for j in range(len(domains) + 1):
                    values = per_run[:, j][np.isfinite(per_run[:, j])]
                    line.append(Cell(Stat.of(values), len(values), short))
            else:
                values = [float(r.accuracy_curve()[-1]) for r in done]
                line.append(Cell(Stat.of([v for v in values if np.isfinite(v)]), len(values), short))
        cells.append(line)
    epsilons = [e for e in (dp_epsilon(r) for r in every) if e is not None]
    if epsilons:
        deltas = sorted({float(r.attrs.get("dp_delta", np.nan)) for r in every if dp_epsilon(r) is not None})
        spread = f"{min(epsilons):.2f}" if max(epsilons) - min(epsilons) < 5e-3 else \
            f"{min(epsilons):.2f} to {max(epsilons):.2f}"
        relations = sorted({dp_neighbours(r) for r in every if dp_epsilon(r) is not None})
        notes.append(f"DP: {len(epsilons)} run(s) with DP, ε at the last round {spread} "
                     f"(δ = {', '.join(f'{d:g}' for d in deltas)}; neighbours {' / '.join(relations)}; "
                     f"an upper bound)")
    if outside:
        notes.append(f"{len(outside)} run(s) under {table.name}/ but not one of its cells "
                     f"(<OUT>/{table.name}/<column>/<row>/seed<k>) not used, e.g. {outside[0]}")
    if not every:
        notes.append(f"no run of table {table.name} under {', '.join(map(str, paths))} (expected "
                     f"<OUT>/{table.name}/<column>/<row>/seed<k>/results.h5)")
    notes += list(table.notes)
    return PaperTable(table.title, table.seeds, [r.name for r in table.rows], columns, cells, notes, every)


def format_paper_table(pt: PaperTable, fmt: str = "table") -> str:
    """`table` (aligned text), `markdown`, `csv` (percent; per column its mean, std and number of
    runs) or `latex` (booktabs tabular; the best mean of each column in bold). Accuracies in
    percent with two decimals; `*` marks a cell missing some of the table's seeds; `-` a cell
    with no complete run, `n/a` a row marked missing."""
    if fmt not in TABLE_FORMATS:
        raise PFedMoAPError(f"format: {fmt!r}; expected one of {', '.join(TABLE_FORMATS)}")
    seeds = ", ".join(str(s) for s in pt.seeds)
    what = f"mean ± std over seeds {seeds} of the mean client accuracy (%) at the last round"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["method"] + [f"{c}_{p}" for c in pt.columns for p in ("mean", "std", "n")])
        for name, line in zip(pt.rows, pt.cells):
            values = [name]
            for j in range(len(pt.columns)):
                cell = None if line is None else line[j]
                stat = None if cell is None else cell.stat
                values += ["" if stat is None else repr(100 * stat.mean),
                           "" if stat is None or stat.std is None else repr(100 * stat.std),
                           "" if cell is None else cell.n]
            writer.writerow(values)
        return out.getvalue()
    if fmt == "latex":
        return _latex(pt, what)

    def text(cell: Cell | None, missing: bool) -> str:
        if missing:
            return "n/a"
        if cell is None or cell.stat is None:
            return "-"
        return _pm(cell.stat, 100) + ("*" if cell.short else "")
    body = [[name] + [text(None if line is None else line[j], line is None) for j in range(len(pt.columns))]
            for name, line in zip(pt.rows, pt.cells)]
    header = ["method"] + pt.columns
    if fmt == "markdown":
        lines = [f"**{pt.title}** ({what})", "", "| " + " | ".join(header) + " |",
                 "|---|" + "|".join("---:" for _ in pt.columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        lines += ([""] + [f"- {note}" for note in pt.notes]) if pt.notes else []
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    lines = [pt.title, what, "", line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    lines += ([""] + [f"note: {note}" for note in pt.notes]) if pt.notes else []
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "·": r"$\cdot$", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                  **{ch: f"$\\{name}$" for ch, name in zip("αβγδελμσ", ("alpha", "beta", "gamma", "delta",
                                                                        "epsilon", "lambda", "mu", "sigma"))}}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex(pt: PaperTable, what: str) -> str:
    best = []
    for j in range(len(pt.columns)):
        means = [line[j].stat.mean for line in pt.cells if line is not None and line[j].stat is not None]
        best.append(max(means) if means else None)
    lines = [f"% {pt.title}", f"% {what}; best mean per column in bold"
             + ("; * = some of the table's seeds missing" if any(
                 c.short for line in pt.cells if line for c in line if c.stat is not None) else ""),
             r"\begin{tabular}{l" + "c" * len(pt.columns) + "}", r"\toprule",
             " & ".join(["Method"] + [_tex(c) for c in pt.columns]) + r" \\", r"\midrule"]
    for name, line in zip(pt.rows, pt.cells):
        values = [_tex(name)]
        for j in range(len(pt.columns)):
            cell = None if line is None else line[j]
            if line is None:
                values.append("n/a")
            elif cell is None or cell.stat is None:
                values.append("--")
            else:
                number = f"{100 * cell.stat.mean:.2f}" + (
                    "" if cell.stat.std is None else rf" \pm {100 * cell.stat.std:.2f}")
                if best[j] is not None and cell.stat.mean == best[j]:
                    number = rf"\mathbf{{{number}}}"
                values.append(f"${number}" + ("^{*}" if cell.short else "") + "$")
        lines.append(" & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% note: {note}" for note in pt.notes]
    return "\n".join(lines) + "\n"


def report_table(name: str, paths: list[str], fmt: str = "table", plot_dir: str | None = None,
                 tables_file: str | None = None) -> str:
    """What `pfedmoap report --table NAME PATH... [--format F] [--plot DIR]` prints."""
    from . import tables
    if fmt not in TABLE_FORMATS:
        raise PFedMoAPError(f"format: {fmt!r}; expected one of {', '.join(TABLE_FORMATS)}")
    if not paths:
        raise PFedMoAPError("report: no run directory given; expected at least one")
    pt = paper_table(tables.get(name, tables_file), paths)
    text = format_paper_table(pt, fmt)
    if plot_dir is not None:
        figures = plot_runs(pt.runs, plot_dir)
        if fmt in ("table", "markdown"):
            text += f"\n{len(figures)} figure(s) written to {plot_dir}\n"
    return text


# ---------------------------------------------------------------------------------- entry point

def report_main(paths: list[str], fmt: str = "table", plot_dir: str | None = None,
                table: str | None = None, tables_file: str | None = None) -> str:
    """What `pfedmoap report RUN_DIR... [--format F] [--plot DIR] [--table NAME]` prints. Any path
    that is not a run raises PFedMoAPError before anything is written."""
    if table is not None or tables_file is not None:
        if table is None:
            raise PFedMoAPError("--tables goes with --table TABLE")
        return report_table(table, paths, fmt, plot_dir, tables_file)
    if fmt == "latex":
        raise PFedMoAPError("--format latex: only with --table TABLE (the paper's layout)")
    _check_format(fmt)
    if not paths:
        raise PFedMoAPError("report: no run directory given; expected at least one")
    runs = [load_run(p) for p in paths]
    text = format_table(summarize(runs), fmt)
    if plot_dir is not None:
        figures = plot_runs(runs, plot_dir)
        if fmt != "csv":  # CSV output stays machine-readable
            text += f"\n{len(figures)} figure(s) written to {plot_dir}\n"
    return text


# -------------------------------------------------------------------------------------- helpers

def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise PFedMoAPError(f"format: {fmt!r}; expected one of {', '.join(FORMATS)}")


def _parse_config(text) -> dict:
    try:
        return tomllib.loads(text) if isinstance(text, str) else {}
    except tomllib.TOMLDecodeError:
        return {"_unparsed": text}


def _without_seed(config: dict) -> dict:
    return {k: (_without_seed(v) if isinstance(v, dict) else v)
            for k, v in config.items() if k not in SEED_KEYS}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _name_variants(groups: list[Group]) -> None:
    """For groups sharing algorithm, data set and partition, name the config keys that differ."""
    by_label: dict[tuple, list[Group]] = {}
    for group in groups:
        by_label.setdefault(group.label, []).append(group)
    for members in by_label.values():
        flats = [_flatten(_without_seed(g.runs[0].config)) for g in members]
        keys = sorted({key for flat in flats for key in flat
                       if len({json.dumps(other.get(key), default=str) for other in flats}) > 1})
        for group, flat in zip(members, flats):
            group.variant = ", ".join(f"{k}={flat.get(k)}" for k in keys)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _nanmean(values, axis=None):
    with warnings.catch_warnings():  # an all-NaN slice (no expert, no test image) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)
