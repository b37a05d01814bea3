"""`pfedmoap report`: what it prints (library code: nothing here parses arguments or prints)."""
from __future__ import annotations

from ..errors import PFedMoAPError
from .figures import plot_runs
from .protocols import protocol_table
from .paper_tables import TABLE_FORMATS, format_paper_table, paper_table
from .runs import load_run
from .summary import check_format, format_table, summarize


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
    check_format(fmt)
    if not paths:
        raise PFedMoAPError("report: no run directory given; expected at least one")
    runs = [load_run(p) for p in paths]
    text = format_table(summarize(runs), fmt)
    if fmt != "csv":                 # the evaluation protocols' metrics (CSV stays one table)
        text += protocol_table(runs)
    if plot_dir is not None:
        text += _plot(runs, plot_dir, fmt != "csv")    # CSV output stays machine-readable
    return text


def report_table(name: str, paths: list[str], fmt: str = "table", plot_dir: str | None = None,
                 tables_file: str | None = None) -> str:
    """What `pfedmoap report --table NAME PATH... [--format F] [--plot DIR]` prints."""
    from .. import tables
    check_format(fmt, TABLE_FORMATS)
    if not paths:
        raise PFedMoAPError("report: no run directory given; expected at least one")
    pt = paper_table(tables.get(name, tables_file), paths)
    text = format_paper_table(pt, fmt)
    if plot_dir is not None:
        text += _plot(pt.runs, plot_dir, fmt in ("table", "markdown"))
    return text


def _plot(runs, plot_dir: str, say: bool) -> str:
    skipped: list[str] = []
    figures = plot_runs(runs, plot_dir, skipped)
    if not say:
        return ""
    return f"\n{len(figures)} figure(s) written to {plot_dir}\n" + "".join(f"  {s}\n" for s in skipped)
