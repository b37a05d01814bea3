"""Paper tables: the runs of a table (tables.toml) in the paper's layout, methods x data sets (or
x domains), each cell the mean ± std over seeds of the mean client accuracy at the last round;
rendered as text, Markdown, CSV or LaTeX (latex.py).

Two layouts read the evaluation protocols' metrics (docs/hdf5-layout.md): "base2novel" (each data
set's Local / Base / Novel / HM, from /rounds/accuracy, base_accuracy and novel_accuracy) and
"held_out" (a column per held-out domain, from /rounds/held_out_accuracy, and their average)."""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import PFedMoAPError
from .latex import latex
from .runs import Run, Stat, dp_epsilon, dp_neighbours, find_results, load_run, nanmean, pm
from .summary import FORMATS

TABLE_FORMATS = FORMATS + ("latex",)


class Cell(NamedTuple):
    """One table cell: mean ± std over the complete runs of a (row, column) in fractions, how many
    runs that is, and whether seeds planned by the table are missing from it."""
    stat: Stat | None
    n: int
    short: bool


@dataclass
class PaperTable:
    """A table in the paper's layout: `cells[i]` is row i's cells (None: a row marked missing).
    `groups`: (name, number of columns) spanning the columns in order (base2novel: a data set's
    Local / Base / Novel / HM), shown as a header row above them in LaTeX; empty: none."""
    title: str
    seeds: tuple
    rows: list[str]
    columns: list[str]
    cells: list[list[Cell] | None]
    notes: list[str]
    runs: list[Run]
    what: str = "the mean client accuracy (%) at the last round"
    groups: tuple = ()


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
        out.append(float(nanmean(acc[has, j])) if has.any() else float("nan"))
    return out


B2N_PARTS = ("Local", "Base", "Novel", "HM")
# what a cell is, per layout (after "mean ± std over seeds ... of")
WHAT = {
    "base2novel": "the mean over clients at the last round (%) of: Local, each client on its own test "
                  "split; Base / Novel, each client's model on the test images of all base / novel "
                  "classes; HM = 2·Base·Novel / (Base + Novel) of the run; Average: over the data sets",
    "held_out": "the mean over clients at the last round of each client's model's accuracy (%) on the "
                "held-out domain's test images; Avg: over the held-out domains",
}
# the per-client metric each protocol layout reads, and the protocol that writes it
METRICS = {"base2novel": (("base_accuracy", "novel_accuracy"), "base2novel"),
           "held_out": (("held_out_accuracy",), "leave_one_domain_out")}


def harmonic_mean(base: float, novel: float) -> float:
    """HM of Base and Novel accuracy, 2BN / (B + N); 0 when both are 0, NaN when either is."""
    if not (np.isfinite(base) and np.isfinite(novel)):
        return float("nan")
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def last_mean(run: Run, name: str) -> float:
    """The mean over clients (those evaluated: NaN skipped) of a per-client metric (R, N) at the
    last round written; NaN when the run has no such metric."""
    values = run.rounds.get(name)
    if not isinstance(values, np.ndarray) or values.ndim != 2 or not len(values):
        return float("nan")
    return float(nanmean(values[-1].astype(np.float64)))


def base_novel(run: Run) -> list[float]:
    """[Local, Base, Novel, HM] of a base-to-novel run at its last round, as fractions."""
    base, novel = last_mean(run, "base_accuracy"), last_mean(run, "novel_accuracy")
    return [float(run.accuracy_curve()[-1]), base, novel, harmonic_mean(base, novel)]


def _lacks(run: Run, layout: str) -> str:
    """Why a complete run cannot fill a cell of a protocol layout ("" when it can)."""
    if layout not in METRICS:
        return ""
    names, protocol = METRICS[layout]
    absent = [n for n in names if not isinstance(run.rounds.get(n), np.ndarray)]
    if not absent:
        return ""
    used = str(run.attrs.get("eval_protocol", "personal"))
    return (f"no /rounds/{absent[0]} (eval.protocol = {used!r}; this layout reads runs of "
            f"eval.protocol = {protocol!r})")


def _average(per_seed: list[dict], layout: str, short: bool) -> list[Cell]:
    """The Avg / Average cells of a row: per seed that every column has, the mean over the columns
    (base2novel: of Local, Base and Novel, HM of those means), then mean ± std over those seeds."""
    seeds = set.intersection(*(set(d) for d in per_seed)) if per_seed else set()
    seeds = sorted(s for s in seeds if all(np.all(np.isfinite(d[s])) for d in per_seed))
    width = len(B2N_PARTS) if layout == "base2novel" else 1
    values = np.full((len(seeds), width), np.nan)
    for i, s in enumerate(seeds):
        mean = np.mean([d[s] for d in per_seed], axis=0)
        if layout == "base2novel":
            mean[3] = harmonic_mean(mean[1], mean[2])
        values[i] = mean
    short = short or len(seeds) < max((len(d) for d in per_seed), default=0)
    return [Cell(Stat.of(values[:, j]), len(seeds), short) for j in range(width)]


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
    groups: tuple = ()
    if table.layout == "domains":
        columns = [table.domain_label(d) for d in domains] + ["Avg"]
    elif table.layout == "base2novel":
        names = [c.name for c in table.columns] + (["Average"] if len(table.columns) > 1 else [])
        columns = [f"{n} {part}" for n in names for part in B2N_PARTS]
        groups = tuple((n, len(B2N_PARTS)) for n in names)
    elif table.layout == "held_out":
        columns = [c.name for c in table.columns] + (["Avg"] if len(table.columns) > 1 else [])
    else:
        columns = [c.name for c in table.columns]
    cells: list[list[Cell] | None] = []
    for row in table.rows:
        if row.missing:
            cells.append(None)
            notes.append(f"{row.name}: {row.missing} (no runs)")
            continue
        line: list[Cell] = []
        per_seed: list[dict] = []           # protocol layouts: per column, seed -> the run's values
        any_short = False
        for column in table.columns:
            runs = sorted(placed.get((row.key, column.key), []), key=lambda r: (r.seed is None, r.seed))
            done = [r for r in runs if r.status == "complete" and r.readable and r.n_done > 0]
            for r in runs:
                if r not in done:
                    notes.append(f"{column.name} / {row.name}: {r.path}: {r.status}, {r.n_done} of "
                                 f"{r.n_planned} rounds: not counted")
            for r in list(done):
                why = _lacks(r, table.layout)
                if why:
                    notes.append(f"{column.name} / {row.name}: {r.path}: {why}: not counted")
                    done.remove(r)
            seeds = {r.seed for r in done}
            short = bool(set(table.seeds) - seeds)
            any_short = any_short or short
            if short and done:
                notes.append(f"{column.name} / {row.name}: seeds {', '.join(str(s) for s in sorted(seeds))} "
                             f"of {', '.join(str(s) for s in table.seeds)} (*)")
            if table.layout == "domains":
                per_run = np.array([domain_accuracies(r, domains) + [float(r.accuracy_curve()[-1])]
                                    for r in done]).reshape(len(done), len(domains) + 1)
                for j in range(len(domains) + 1):
                    values = per_run[:, j][np.isfinite(per_run[:, j])]
                    line.append(Cell(Stat.of(values), len(values), short))
            elif table.layout in METRICS:
                per_run = np.array([base_novel(r) if table.layout == "base2novel" else
                                    [last_mean(r, "held_out_accuracy")] for r in done]).reshape(len(done), -1)
                width = len(B2N_PARTS) if table.layout == "base2novel" else 1
                for j in range(width):
                    values = per_run[:, j][np.isfinite(per_run[:, j])] if len(done) else []
                    line.append(Cell(Stat.of(values), len(values), short))
                per_seed.append({r.seed: per_run[i] for i, r in enumerate(done)})
            else:
                values = [float(r.accuracy_curve()[-1]) for r in done]
                line.append(Cell(Stat.of([v for v in values if np.isfinite(v)]), len(values), short))
        if table.layout in METRICS and len(table.columns) > 1:
            line += _average(per_seed, table.layout, any_short)
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
    return PaperTable(table.title, table.seeds, [r.name for r in table.rows], columns, cells, notes, every,
                      WHAT.get(table.layout, PaperTable.what), groups)


def format_paper_table(pt: PaperTable, fmt: str = "table") -> str:
    """`table` (aligned text), `markdown`, `csv` (percent; per column its mean, std and number of
    runs) or `latex` (booktabs tabular; the best mean of each column in bold). Accuracies in
    percent with two decimals; `*` marks a cell missing some of the table's seeds; `-` a cell
    with no complete run, `n/a` a row marked missing."""
    if fmt not in TABLE_FORMATS:
        raise PFedMoAPError(f"format: {fmt!r}; expected one of {', '.join(TABLE_FORMATS)}")
    seeds = ", ".join(str(s) for s in pt.seeds)
    what = f"mean ± std over seeds {seeds} of {pt.what}"
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
        return latex(pt, what)

    def text(cell: Cell | None, missing: bool) -> str:
        if missing:
            return "n/a"
        if cell is None or cell.stat is None:
            return "-"
        return pm(cell.stat, 100) + ("*" if cell.short else "")
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
