"""The evaluation protocols' metrics of runs (eval.protocol, docs/protocols.md), at the last round
that evaluated every client, as mean ± std over the seeds of a configuration:

- base2novel: Local (/rounds/accuracy), Base, Novel and HM = 2BN/(B+N) of the mean-over-clients
  Base and Novel accuracy; the same for the method's global model where it has one;
- leave_one_domain_out: Local and the held-out domain's accuracy (mean over clients);
- cross_dataset: Local and each target data set's accuracy (mean over clients);
- dual: the personal models' and the global model's accuracy, each as the mean over clients and
  over the union of the clients' test images (sum_c acc_c n_c / sum_c n_c).

Each value is computed per run, then averaged over seeds (HM too: the HM of a run, then the mean).
"""
from __future__ import annotations

import numpy as np

from .runs import Run, Stat, nanmean, pm
from .summary import group_runs


def protocol(run: Run) -> str:
    return str(run.attrs.get("eval_protocol", "personal"))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N) (NaN when either is NaN; 0 when both are 0)."""
    if not (np.isfinite(base) and np.isfinite(novel)):
        return float("nan")
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def _last_full(run: Run) -> int | None:
    full = np.flatnonzero(run.full_rounds())
    return int(full[-1]) if len(full) else None


def _test_sizes(run: Run) -> np.ndarray:
    counts = run.partition.get("test_class_counts")
    return np.asarray(counts).sum(axis=1) if counts is not None else np.ones(run.rounds["accuracy"].shape[1])


def run_metrics(run: Run) -> dict[str, float]:
    """The protocol's metrics of one run at its last fully evaluated round (fractions); {} for a
    personal run or one without such a round."""
    r, name = _last_full(run), protocol(run)
    if r is None or name == "personal":
        return {}
    rd = run.rounds

    def mean(key):
        return float(nanmean(rd[key][r])) if key in rd else float("nan")
    out = {"Local": mean("accuracy")}
    if name == "base2novel":
        for prefix, label in (("", ""), ("global_", "global ")):
            b, n = mean(f"{prefix}base_accuracy"), mean(f"{prefix}novel_accuracy")
            out.update({f"{label}Base": b, f"{label}Novel": n, f"{label}HM": harmonic_mean(b, n)})
    elif name == "leave_one_domain_out":
        out[f"held-out {run.attrs.get('eval_held_out', '?')}"] = mean("held_out_accuracy")
    elif name == "cross_dataset":
        targets = [str(t) for t in np.atleast_1d(run.attrs.get("eval_targets", []))]
        acc = rd.get("target_accuracy")
        for t, name_t in enumerate(targets):
            out[name_t] = float(nanmean(acc[r][:, t])) if acc is not None else float("nan")
    elif name == "dual":
        n = _test_sizes(run)
        out = {"personal (mean)": mean("accuracy"), "global (mean)": mean("global_accuracy")}
        for key, label in (("accuracy", "personal (union)"), ("global_accuracy", "global (union)")):
            acc = rd[key][r] if key in rd else np.full(len(n), np.nan)
            ok = np.isfinite(acc) & (n > 0)
            out[label] = float((acc[ok] * n[ok]).sum() / n[ok].sum()) if ok.any() and ok.sum() == (n > 0).sum() \
                else float("nan")
    return out


def protocol_table(runs: list[Run]) -> str:
    """Text lines: one block per protocol among the runs (none for personal runs only)."""
    blocks: dict[str, list[tuple[str, dict[str, Stat]]]] = {}
    for group in group_runs(runs):
        name = protocol(group.runs[0])
        per_run = [run_metrics(r) for r in group.runs if r.readable]
        per_run = [m for m in per_run if m]
        if name == "personal" or not per_run:
            continue
        keys = list(dict.fromkeys(k for m in per_run for k in m))
        stats = {k: Stat.of([m.get(k, np.nan) for m in per_run]) for k in keys}
        algo, dataset, partition = group.label
        label = f"{algo} {dataset} {partition}" + (f" ({group.variant})" if group.variant else "")
        label += f" seeds {','.join(str(r.seed) for r in group.runs)}"
        blocks.setdefault(name, []).append((label, stats))
    lines = []
    for name, rows in blocks.items():
        keys = list(dict.fromkeys(k for _, s in rows for k in s))
        if name == "base2novel" and all(not np.isfinite(s.get("global Base", Stat(np.nan, None)).mean)
                                        for _, s in rows):
            keys = [k for k in keys if not k.startswith("global ")]    # no method with a global model
        cells = [[label] + [pm(s.get(k), 100) or "-" for k in keys] for label, s in rows]
        head = ["run"] + keys
        widths = [max(len(x) for x in col) for col in zip(head, *cells)]
        fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                     for i, (v, w) in enumerate(zip(vals, widths))).rstrip()
        lines += ["", f"eval.protocol = {name} (%, last fully evaluated round; docs/protocols.md)",
                  fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells]
    return "\n".join(lines) + ("\n" if lines else "")
