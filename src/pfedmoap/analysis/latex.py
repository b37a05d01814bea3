"""LaTeX for a paper table: a booktabs tabular, `$mean \\pm std$` cells, the best mean of each
column in bold, title and notes as `%` comments."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .paper_tables import PaperTable

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "·": r"$\cdot$", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                  **{ch: f"$\\{name}$" for ch, name in zip("αβγδελμσ", ("alpha", "beta", "gamma", "delta",
                                                                        "epsilon", "lambda", "mu", "sigma"))}}


def tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _own_names(pt: PaperTable) -> list[str]:
    """Each column's name without its group's ("Caltech101 Base" under Caltech101: "Base")."""
    out, j = [], 0
    for name, width in pt.groups:
        for c in pt.columns[j:j + width]:
            out.append(c[len(name) + 1:] if c.startswith(f"{name} ") else c)
        j += width
    return out + list(pt.columns[j:])


def latex(pt: PaperTable, what: str) -> str:
    best = []
    for j in range(len(pt.columns)):
        means = [line[j].stat.mean for line in pt.cells if line is not None and line[j].stat is not None]
        best.append(max(means) if means else None)
    lines = [f"% {pt.title}", f"% {what}; best mean per column in bold"
             + ("; * = some of the table's seeds missing" if any(
                 c.short for line in pt.cells if line for c in line if c.stat is not None) else ""),
             r"\begin{tabular}{l" + "c" * len(pt.columns) + "}", r"\toprule"]
    if pt.groups:           # a header row of groups (a data set), then their columns' own names
        spans, rules, at = [""], [], 2
        for name, width in pt.groups:
            spans.append(rf"\multicolumn{{{width}}}{{c}}{{{tex(name)}}}")
            rules.append(rf"\cmidrule(lr){{{at}-{at + width - 1}}}")
            at += width
        lines += [" & ".join(spans) + r" \\", " ".join(rules),
                  " & ".join(["Method"] + [tex(c) for c in _own_names(pt)]) + r" \\", r"\midrule"]
    else:
        lines += [" & ".join(["Method"] + [tex(c) for c in pt.columns]) + r" \\", r"\midrule"]
    for name, line in zip(pt.rows, pt.cells):
        values = [tex(name)]
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
