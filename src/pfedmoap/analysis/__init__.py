"""Reading runs back: summary tables over seeds, paper tables, curves and comparison figures.

One module per job: `runs` (loading results.h5), `summary` (report rows: text, Markdown, CSV),
`figures` (PNGs; a method's own figures come from its manifest), `paper_tables` and `latex` (a
table of tables.toml in the paper's layout), `report` (what `pfedmoap report` prints), `methods`
(labels, order, colours and figures, read from the method registry). Library code: nothing here
parses arguments or prints.
The headline metric (the paper §4.1, docs/hdf5-layout.md) is the unweighted mean over clients of
the per-client accuracy, at the last round and over the last 5 rounds.
"""
from .figures import accuracy_figure, client_accuracy_figure, plot_runs, run_label, setting  # noqa: F401
from .paper_tables import (TABLE_FORMATS, Cell, PaperTable, domain_accuracies,  # noqa: F401
                           format_paper_table, paper_table)
from .report import report_main, report_table  # noqa: F401
from .runs import LAST_K, Run, Stat, dp_epsilon, dp_neighbours, find_results, load_run  # noqa: F401
from .summary import FORMATS, Group, Row, format_table, group_runs, summarize  # noqa: F401
