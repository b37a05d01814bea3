"""Summaries: runs grouped by configuration (seeds together) into report rows, as an aligned table,
Markdown or CSV. Accuracies in the file are fractions; table and Markdown show percent, the CSV
keeps the file's units."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PFedMoAPError
from ..store import READABLE_RESULTS
from . import methods
from .runs import LAST_K, Run, Stat, dp_epsilon, dp_neighbours, flatten, nanmean, pm, without_seed

FORMATS = ("table", "csv", "markdown")


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
    other run stands alone. Sorted by data set, partition, then method in report order."""
    groups: dict[str, Group] = {}
    seen: set[Path] = set()
    for run in runs:
        where = run.path.resolve()
        if where in seen:  # the same run named twice
            continue
        seen.add(where)
        if run.status == "complete":
            key = json.dumps([run.algorithm, run.attrs.get("dataset"), run.attrs.get("partition"),
                              run.n_done, without_seed(run.config)], sort_keys=True, default=str)
        else:
            key = str(where)
        groups.setdefault(key, Group()).runs.append(run)
    out = list(groups.values())
    _name_variants(out)

    def order(g: Group):
        algo, dataset, partition = g.label
        return (dataset, partition, methods.order(algo), g.variant, str(g.runs[0].seed))
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
    row.acc_last5 = Stat.of(nanmean(curves[:, -LAST_K:], axis=1))
    mean_curve = curves.mean(axis=0)
    if np.isfinite(mean_curve).any():
        best = int(np.nanargmax(mean_curve))
        row.best_round, row.best_acc = best + 1, Stat.of(curves[:, best])
    if all("macro_f1" in r.rounds for r in runs):
        row.macro_f1 = Stat.of([nanmean(r.rounds["macro_f1"][-1]) for r in runs])
    if all("bytes_up" in r.rounds and "bytes_down" in r.rounds for r in runs):
        row.bytes_per_round = Stat.of([
            (r.rounds["bytes_up"].sum(axis=1) + r.rounds["bytes_down"].sum(axis=1)).mean()
            for r in runs])
    epsilons = [dp_epsilon(r) for r in runs]
    if all(e is not None for e in epsilons):
        row.dp_epsilon, row.dp_delta = Stat.of(epsilons), float(first.attrs.get("dp_delta", np.nan))
        row.dp_neighbours = dp_neighbours(first)
    return row


def _name_variants(groups: list[Group]) -> None:
    """For groups sharing algorithm, data set and partition, name the config keys that differ."""
    by_label: dict[tuple, list[Group]] = {}
    for group in groups:
        by_label.setdefault(group.label, []).append(group)
    for members in by_label.values():
        flats = [flatten(without_seed(g.runs[0].config)) for g in members]
        keys = sorted({key for flat in flats for key in flat
                       if len({json.dumps(other.get(key), default=str) for other in flats}) > 1})
        for group, flat in zip(members, flats):
            group.variant = ", ".join(f"{k}={flat.get(k)}" for k in keys)


# ---------------------------------------------------------------------------------------- tables

_COLUMNS = ("algorithm", "dataset", "partition", "variant", "seeds", "status", "rounds",
            "acc last (%)", f"acc last {LAST_K} (%)", "best round", "best acc (%)",
            "macro-F1 (%)", "bytes/round")


def check_format(fmt: str, formats=FORMATS) -> None:
    if fmt not in formats:
        raise PFedMoAPError(f"format: {fmt!r}; expected one of {', '.join(formats)}")


def format_table(rows: list[Row], fmt: str = "table") -> str:
    """`table` (aligned text for a terminal), `markdown`, or `csv` (file units, one column per
    mean and std, no notes). Table and Markdown end with one note per run that is incomplete,
    still running or of another schema version."""
    check_format(fmt)
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
            pm(row.acc_last, 100), pm(row.acc_last5, 100),
            "" if row.best_round is None else str(row.best_round), pm(row.best_acc, 100),
            pm(row.macro_f1, 100), _bytes(row.bytes_per_round)]


def _dp_cell(row: Row) -> str:
    stat = row.dp_epsilon
    if stat is None:
        return ""
    eps = "∞" if np.isinf(stat.mean) else pm(stat)
    return f"{eps} ({row.dp_delta:g})"


def _bytes(stat: Stat | None) -> str:
    if stat is None:
        return ""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if stat.mean >= size:
            scaled = Stat(stat.mean / size, None if stat.std is None else stat.std / size)
            return f"{pm(scaled)} {unit}"
    return pm(stat, digits=0) + " B"


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
