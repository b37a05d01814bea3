"""A miniature of the paper-table pipeline (issue 14), on the embedded digits and the shipped micro
CLIP: a table-1-shaped grid (every method of the paper's rows, pFedPrompt marked missing, the CoOp
row as the packaged overlay) x two splits (Dirichlet β = 0.5, pathological) x 2 seeds, run through
the real local script tools/run_table.sh, then the rendered table (text, CSV, LaTeX) checked
against the numbers in the HDF5 files, read with h5py alone. A domains-layout table (a domain per
client, columns = domains + Avg) the same way; one array task of jobs/table.sbatch reproduces its
run of the grid; the submit step computes the --array.

Budget: 5 clients, 8 shots per class, two digit domains, 2 rounds of 1 local epoch (CoOp: its
overlay's 1 round of 25 epochs), every run of a table in one process."""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfedmoap import tables
from pfedmoap.analysis import report_table

pytestmark = pytest.mark.slow          # whole federated runs in subprocesses (README: quick subset)

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")
PROG = f"{sys.executable} -m pfedmoap.cli"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PFEDMOAP=PROG, PFEDMOAP_CMD=PROG)
ALGORITHM = {"zs_clip": "zeroshot", "coop": "local", "promptfl": "promptfl", "promptfl_ft": "promptfl_ft",
             "fedper": "fedper", "fedprox": "fedprox", "fedamp": "fedamp", "fedotp": "fedotp",
             "pfedmoap": "pfedmoap"}
BUDGET = ["rounds=2", "train.local_epochs=1", "train.warmup_epochs=0"]   # the columns' settings

TABLES = f'''
seeds = [1, 2]

[rows]
methods = [
    {{ name = "ZS-CLIP", key = "zs_clip", set = ["algorithm=zeroshot"] }},
    {{ name = "CoOp", key = "coop", with = ["paper/methods/coop"] }},
    {{ name = "PromptFL", key = "promptfl", set = ["algorithm=promptfl"] }},
    {{ name = "PromptFL+FT", key = "promptfl_ft", set = ["algorithm=promptfl_ft"] }},
    {{ name = "PromptFL+FedPer", key = "fedper", set = ["algorithm=fedper"] }},
    {{ name = "PromptFL+FedProx", key = "fedprox", set = ["algorithm=fedprox"] }},
    {{ name = "PromptFL+FedAMP", key = "fedamp", set = ["algorithm=fedamp"] }},
    {{ name = "pFedPrompt", key = "pfedprompt", missing = "not implemented in pfedmoap" }},
    {{ name = "FedOTP", key = "fedotp", set = ["algorithm=fedotp"] }},
    {{ name = "pFedMoAP", key = "pfedmoap", set = ["algorithm=pfedmoap"] }},
]

[tables.mini]
title = "Mini table 1: digits, micro CLIP"
rows = "methods"
columns = [
    {{ name = "Dirichlet β=0.5", key = "dirichlet", config = "digits.toml", set = {BUDGET + ["data.partition=dirichlet", "data.beta=0.5"]!r} }},
    {{ name = "Pathological", key = "pathological", config = "digits.toml", set = {BUDGET + ["data.partition=pathological"]!r} }},
]

[tables.mini_domains]
title = "Mini domain table: a digit domain per client"
rows = [
    {{ name = "ZS-CLIP", key = "zs_clip", set = ["algorithm=zeroshot"] }},
    {{ name = "pFedMoAP", key = "pfedmoap", set = ["algorithm=pfedmoap"] }},
]
layout = "domains"
columns = [{{ name = "digits", key = "digits", set = {BUDGET + ["data.partition=domain", "data.n_clients=3", "data.domains=original,noise,mirror"]!r} }}]
domain_labels = {{ noise = "Noisy" }}
'''
SETS = ["data.n_clients=5", "data.shots=8", "data.domains=original,noise", "run.progress=false", "run.threads=1"]


def _run_table(tmp: Path, table: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [str(ROOT / "tools" / "run_table.sh"), table, str(out), "--tables", str(tmp / "tables.toml"),
            "--set", f"data.cache_dir={tmp / 'cache'}"]
    for s in extra:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=tmp, timeout=900)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mini_table")
    (tmp / "digits.toml").write_text('[data]\ndataset = "digits"\n[train]\nbatch_size = 16\n')
    (tmp / "tables.toml").write_text(TABLES)
    out = tmp / "out"
    p = _run_table(tmp, "mini", out, *SETS)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    d = _run_table(tmp, "mini_domains", out, "data.shots=8", "run.progress=false", "run.threads=1")
    assert d.returncode == 0, (d.stdout[-3000:], d.stderr[-3000:])
    return dict(tmp=tmp, out=out, stdout=p.stdout, domains_stdout=d.stdout,
                table=tables.get("mini", tmp / "tables.toml"),
                domains=tables.get("mini_domains", tmp / "tables.toml"))


def _h5(path: Path) -> dict:
    with h5py.File(path / "results.h5", "r") as f:
        a = dict(f.attrs)
        return dict(attrs=a, accuracy=f["rounds/accuracy"][()].astype(np.float64),
                    domain_accuracy=f["rounds/domain_accuracy"][()].astype(np.float64),
                    test_domain_counts=f["partition/test_domain_counts"][()],
                    domain_names=[str(n) for n in f["partition"].attrs["domain_names"]])


def _expected(runs: list[dict], pick=lambda r: r["accuracy"][-1].mean()) -> tuple[float, float]:
    values = 100 * np.array([pick(r) for r in runs])
    return float(values.mean()), float(values.std(ddof=1))


# ------------------------------------------------------------------------------ the runs

def test_every_cell_of_the_grid_ran_as_its_row_and_column_say(mini):
    table, out = mini["table"], mini["out"]
    specs = table.runs()
    assert len(specs) == 9 * 2 * 2
    for spec in specs:
        r = _h5(spec.out(out))
        a = r["attrs"]
        assert a["status"] == "complete" and a["algorithm"] == ALGORITHM[spec.row.key] and a["seed"] == spec.seed
        cfg = tomllib.loads(a["config"])
        assert cfg["data"]["partition"] == spec.column.key and cfg["data"]["n_clients"] == 5      # column + --set
        assert cfg["data"]["shots"] == 8 and cfg["data"]["domains"] == ["original", "noise"]
        if spec.row.key == "coop":        # the overlay wins over the column's budget
            assert (cfg["rounds"], cfg["train"]["local_epochs"], cfg["train"]["frac"]) == (1, 25, 1.0)
            assert r["accuracy"].shape == (1, 5)
        elif spec.row.key == "zs_clip":
            assert r["accuracy"].shape == (1, 5)
        else:
            assert (cfg["rounds"], cfg["train"]["local_epochs"]) == (2, 1) and r["accuracy"].shape == (2, 5)
    assert not (out / "mini" / "dirichlet" / "pfedprompt").exists()
    # the splits differ; the seeds differ
    p = _h5(out / "mini/pathological/zs_clip/seed1")
    d = _h5(out / "mini/dirichlet/zs_clip/seed1")
    d2 = _h5(out / "mini/dirichlet/zs_clip/seed2")
    assert not np.array_equal(p["accuracy"], d["accuracy"]) and not np.array_equal(d["accuracy"], d2["accuracy"])


# ------------------------------------------------------------------------------ the table

def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_text_table_is_the_paper_layout_with_the_files_numbers(mini):
    table, out = mini["table"], mini["out"]
    text = (out / "mini" / "table.txt").read_text()
    assert text == report_table("mini", [str(out)], "table", tables_file=str(mini["tmp"] / "tables.toml")) + "\n"
    assert text in mini["stdout"]
    lines = text.splitlines()
    assert lines[0] == "Mini table 1: digits, micro CLIP"
    assert lines[1] == "mean ± std over seeds 1, 2 of the mean client accuracy (%) at the last round"
    assert _cells(lines[3]) == ["method", "Dirichlet β=0.5", "Pathological"]
    body = {(c := _cells(line))[0]: c[1:] for line in lines[5:5 + len(table.rows)]}
    assert list(body) == [r.name for r in table.rows]                 # methods as rows, in order
    assert body["pFedPrompt"] == ["n/a", "n/a"]
    assert "note: pFedPrompt: not implemented in pfedmoap (no runs)" in lines
    for row in table.rows:
        if row.missing:
            continue
        for j, column in enumerate(table.columns):
            runs = [_h5(out / "mini" / column.key / row.key / f"seed{s}") for s in (1, 2)]
            mean, std = _expected(runs)
            assert body[row.name][j] == f"{mean:.2f} ± {std:.2f}", (row.name, column.name)
    markdown = report_table("mini", [str(out)], "markdown", tables_file=str(mini["tmp"] / "tables.toml"))
    assert "| method | Dirichlet β=0.5 | Pathological |" in markdown.splitlines()
    for name, cells in body.items():           # the same cells as the text table
        assert f"| {name} | {' | '.join(cells)} |" in markdown.splitlines()


def test_csv_and_latex_carry_the_same_numbers(mini):
    table, out = mini["table"], mini["out"]
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "mini" / "table.csv").read_text()))}
    assert list(rows) == [r.name for r in table.rows]
    assert list(rows["PromptFL"]) == ["method", "Dirichlet β=0.5_mean", "Dirichlet β=0.5_std", "Dirichlet β=0.5_n",
                                      "Pathological_mean", "Pathological_std", "Pathological_n"]
    tex = (out / "mini" / "table.tex").read_text()
    assert r"\begin{tabular}{lcc}" in tex and r"Method & Dirichlet $\beta$=0.5 & Pathological \\" in tex
    tex_rows = {line.split(" & ")[0]: line.split(" & ")[1:] for line in tex.splitlines() if line.endswith(r"\\")}
    assert tex_rows["pFedPrompt"] == ["n/a", r"n/a \\"]
    means = {}
    for row in table.rows:
        if row.missing:
            assert rows[row.name]["Pathological_mean"] == "" and rows[row.name]["Pathological_n"] == ""
            continue
        for j, column in enumerate(table.columns):
            runs = [_h5(out / "mini" / column.key / row.key / f"seed{s}") for s in (1, 2)]
            mean, std = _expected(runs)
            means.setdefault(j, {})[row.name] = mean
            assert float(rows[row.name][f"{column.name}_mean"]) == pytest.approx(mean, abs=1e-4)
            assert float(rows[row.name][f"{column.name}_std"]) == pytest.approx(std, abs=1e-4)
            assert rows[row.name][f"{column.name}_n"] == "2"
            cell = tex_rows[row.name.replace("_", r"\_")][j].removesuffix(r" \\")
            number = f"{mean:.2f} \\pm {std:.2f}"
            assert cell in (f"${number}$", f"$\\mathbf{{{number}}}$"), (row.name, cell)
    for j, column in enumerate(table.columns):          # the best mean of each column (ties: each), in bold
        best = [name for name, m in means[j].items() if m == max(means[j].values())]
        bold = [name for name, cells in tex_rows.items() if r"\mathbf" in cells[j]]
        assert bold == best, (column.name, bold, means[j])


def test_domain_table_has_the_domains_and_the_average_as_columns(mini):
    t, out = mini["domains"], mini["out"]
    text = (out / "mini_domains" / "table.txt").read_text()
    lines = text.splitlines()
    assert _cells(lines[3]) == ["method", "original", "Noisy", "mirror", "Avg"]
    body = {(c := _cells(line))[0]: c[1:] for line in lines[5:7]}
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "mini_domains" / "table.csv").read_text()))}
    for row in t.rows:
        runs = [_h5(out / "mini_domains" / "digits" / row.key / f"seed{s}") for s in (1, 2)]
        assert runs[0]["domain_names"] == ["original", "noise", "mirror"]
        for j, domain in enumerate(["original", "noise", "mirror"]):
            def pick(r, j=j):
                has = r["test_domain_counts"][:, j] > 0
                assert has.sum() == 1                      # one client per domain here
                return np.nanmean(r["domain_accuracy"][-1][has, j])
            mean, std = _expected(runs, pick)
            assert body[row.name][j] == f"{mean:.2f} ± {std:.2f}"
            label = ["original", "Noisy", "mirror"][j]
            assert float(rows[row.name][f"{label}_mean"]) == pytest.approx(mean, abs=1e-4)
        mean, std = _expected(runs)
        assert body[row.name][3] == f"{mean:.2f} ± {std:.2f}"
        assert float(rows[row.name]["Avg_std"]) == pytest.approx(std, abs=1e-4)


def test_missing_seeds_and_unfinished_runs_are_marked_not_counted(mini, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(mini["out"] / "mini_domains", out / "mini_domains")
    shutil.rmtree(out / "mini_domains" / "digits" / "zs_clip" / "seed2")
    with h5py.File(out / "mini_domains" / "digits" / "pfedmoap" / "seed1" / "results.h5", "r+") as f:
        f.attrs["status"] = "running"
    text = report_table("mini_domains", [str(out)], "table", tables_file=str(mini["tmp"] / "tables.toml"))
    lines = text.splitlines()
    zs = _cells(next(line for line in lines if line.startswith("ZS-CLIP")))
    moap = _cells(next(line for line in lines if line.startswith("pFedMoAP")))
    one = _h5(out / "mini_domains" / "digits" / "zs_clip" / "seed1")
    assert zs[4] == f"{100 * one['accuracy'][-1].mean():.2f}*"         # one seed: no std, marked
    two = _h5(out / "mini_domains" / "digits" / "pfedmoap" / "seed2")
    assert moap[4] == f"{100 * two['accuracy'][-1].mean():.2f}*"
    assert "note: digits / ZS-CLIP: seeds 1 of 1, 2 (*)" in lines
    assert any(line.startswith("note: digits / pFedMoAP: ") and line.endswith("running, 2 of 2 rounds: not counted")
               for line in lines), lines


def test_rerunning_the_script_keeps_complete_runs(mini):
    run = mini["out"] / "mini_domains" / "digits" / "pfedmoap" / "seed1" / "results.h5"
    before = run.stat().st_mtime_ns
    p = _run_table(mini["tmp"], "mini_domains", mini["out"], "data.shots=8", "run.progress=false", "run.threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "# table mini_domains: 4 of 4 runs already complete: kept" in p.stdout
    assert run.stat().st_mtime_ns == before
    assert (mini["out"] / "mini_domains" / "table.txt").read_text() in p.stdout


# ------------------------------------------------------------------------------ SLURM script

def _sbatch(tmp: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "jobs" / "table.sbatch"), *args], capture_output=True, text=True,
                          cwd=tmp, timeout=600, env={**ENV, "TABLES": str(tmp / "tables.toml"), **env})


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the venv's python")
def test_an_array_task_is_its_run_of_the_table(mini, tmp_path):
    spec = next(s for s in mini["table"].runs() if s.row.key == "pfedmoap" and s.column.key == "pathological"
                and s.seed == 2)
    sets = " ".join(SETS + [f"data.cache_dir={mini['tmp'] / 'cache'}"])
    env = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "6", "SLURM_ARRAY_TASK_ID": str(spec.index),
           "SLURM_NTASKS": "1", "MPIEXEC": str(MPIEXEC), "OUT": str(tmp_path / "slurm"), "SETS": sets}
    p = _sbatch(mini["tmp"], env, "mini")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert f"(table mini, run {spec.index} of 36: {spec.out(tmp_path / 'slurm')})" in p.stdout
    mine, theirs = _h5(spec.out(tmp_path / "slurm")), _h5(spec.out(mini["out"]))
    np.testing.assert_array_equal(mine["accuracy"], theirs["accuracy"])
    assert mine["attrs"]["config_hash"] == theirs["attrs"]["config_hash"]


def test_submitting_computes_the_array_and_bad_indices_are_one_line(mini, tmp_path):
    fake = tmp_path / "sbatch"
    fake.write_text('#!/bin/bash\necho "sbatch $* TABLE=$TABLE"\n')
    fake.chmod(0o755)
    p = _sbatch(mini["tmp"], {"SBATCH": str(fake)}, "mini", "--gres=gpu:1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"sbatch --array=0-35 --gres=gpu:1 {ROOT / 'jobs' / 'table.sbatch'} TABLE=mini"
    assert (mini["tmp"] / "logs").is_dir()
    p = _sbatch(mini["tmp"], {"SBATCH": str(fake)}, "mini", "--array=3")
    assert p.stdout.strip() == f"sbatch --array=3 {ROOT / 'jobs' / 'table.sbatch'} TABLE=mini"
    p = _sbatch(mini["tmp"], {"SLURM_JOB_ID": "7"}, "mini")
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: no array index: table mini is 36 runs, one per array task; submit with --array=0-35 "
        "or run jobs/table.sbatch mini")
    p = _sbatch(mini["tmp"], {"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "36"}, "mini")
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: array task 36 but table mini has only 36 runs; submit with --array=0-35")
