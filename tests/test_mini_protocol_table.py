"""A miniature of the protocol tables (issue 22) through the real local script tools/run_table.sh,
on the embedded digits and the shipped micro CLIP: a base-to-novel table (base digits 0-4, novel
5-9; three methods x 2 seeds) and a leave-one-domain-out table (two held-out digit domains), then
the rendered tables (text, CSV, LaTeX) checked against the numbers in the HDF5 files, read with
h5py alone.

Needs the evaluation protocols (eval.protocol = "base2novel" / "leave_one_domain_out",
eval.held_out): skipped where config has no [eval] key besides `protocol`.
Budget: 4 (base-to-novel) or 2 (a domain each) clients, 8 shots, 2 rounds of 1 local epoch."""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfedmoap import config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(dataclasses.fields(config.EvalConfig)) <= 1,
                                 reason="needs the evaluation protocols (eval.held_out)")]

ROOT = Path(__file__).resolve().parents[1]
PROG = f"{sys.executable} -m pfedmoap.cli"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PFEDMOAP=PROG)
BUDGET = ["rounds=2", "train.local_epochs=1", "train.warmup_epochs=0"]
ROWS = '''[
    { name = "ZS-CLIP", key = "zs_clip", set = ["algorithm=zeroshot"] },
    { name = "PromptFL", key = "promptfl", set = ["algorithm=promptfl"] },
    { name = "pFedMoAP", key = "pfedmoap", set = ["algorithm=pfedmoap", "moe.n_experts=2"] },
]'''
B2N = BUDGET + ["eval.protocol=base2novel", "data.n_clients=4", "data.partition=dirichlet", "data.beta=0.5"]
LODO = BUDGET + ["eval.protocol=leave_one_domain_out", "data.partition=domain", "data.clients_per_domain=1",
                 "data.n_clients=2", "data.domains=original,noise,mirror"]
TABLES = f'''
seeds = [1, 2]

[tables.mini_b2n]
title = "Mini base-to-novel: digits, micro CLIP"
layout = "base2novel"
rows = {ROWS}
columns = [{{ name = "Digits", key = "digits", config = "digits.toml", set = {B2N!r} }}]

[tables.mini_lodo]
title = "Mini leave-one-domain-out: digits, micro CLIP"
layout = "held_out"
rows = {ROWS}
columns = [
    {{ name = "Noisy", key = "noise", config = "digits.toml", set = {LODO + ["eval.held_out=noise"]!r} }},
    {{ name = "Mirror", key = "mirror", config = "digits.toml", set = {LODO + ["eval.held_out=mirror"]!r} }},
]
'''
KEYS = ("zs_clip", "promptfl", "pfedmoap")
NAMES = ("ZS-CLIP", "PromptFL", "pFedMoAP")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mini_protocols")
    (tmp / "digits.toml").write_text('[data]\ndataset = "digits"\nshots = 8\n[train]\nbatch_size = 16\n')
    (tmp / "tables.toml").write_text(TABLES)
    out = tmp / "out"
    stdout = {}
    for table in ("mini_b2n", "mini_lodo"):
        p = subprocess.run([str(ROOT / "tools" / "run_table.sh"), table, str(out), "--tables", str(tmp / "tables.toml"),
                            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "run.progress=false",
                            "--set", "run.threads=1"], capture_output=True, text=True, env=ENV, cwd=tmp, timeout=900)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
        stdout[table] = p.stdout
    return dict(tmp=tmp, out=out, stdout=stdout)


def _h5(path: Path) -> dict:
    with h5py.File(path / "results.h5", "r") as f:
        return {"attrs": dict(f.attrs), **{k: f["rounds"][k][()].astype(np.float64) for k in
                                          ("accuracy", "base_accuracy", "novel_accuracy", "held_out_accuracy")
                                          if k in f["rounds"]}}


def _pm(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _body(text: str) -> dict:
    return {(c := re.split(r"\s{2,}", line.strip()))[0]: c[1:] for line in text.splitlines()[5:]
            if line.strip() and not line.startswith("note:")}


def test_base_to_novel_table_is_the_files_numbers(mini):
    out = mini["out"] / "mini_b2n"
    text = (out / "table.txt").read_text()
    assert text in mini["stdout"]["mini_b2n"]
    body = _body(text)
    for key, name in zip(KEYS, NAMES):
        runs = [_h5(out / "digits" / key / f"seed{s}") for s in (1, 2)]
        for r in runs:
            assert r["attrs"]["eval_protocol"] == "base2novel"
            assert [str(c) for c in r["attrs"]["novel_classes"]] and len(r["attrs"]["base_classes"]) == 5
        local = [np.nanmean(r["accuracy"][-1]) for r in runs]
        base = np.array([np.nanmean(r["base_accuracy"][-1]) for r in runs])
        novel = np.array([np.nanmean(r["novel_accuracy"][-1]) for r in runs])
        hm = 2 * base * novel / (base + novel)
        assert body[name] == [_pm(local), _pm(base), _pm(novel), _pm(hm)], name
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "table.csv").read_text()))}
    assert rows["PromptFL"]["Digits HM_n"] == "2"
    tex = (out / "table.tex").read_text()
    assert r" & \multicolumn{4}{c}{Digits} \\" in tex.splitlines()
    assert r"Method & Local & Base & Novel & HM \\" in tex.splitlines()


def test_leave_one_domain_out_table_is_the_files_numbers(mini):
    out = mini["out"] / "mini_lodo"
    body = _body((out / "table.txt").read_text())
    for key, name in zip(KEYS, NAMES):
        per = {}
        for domain in ("noise", "mirror"):
            runs = [_h5(out / domain / key / f"seed{s}") for s in (1, 2)]
            assert all(r["attrs"]["eval_held_out"] == domain for r in runs)
            per[domain] = np.array([np.nanmean(r["held_out_accuracy"][-1]) for r in runs])
        assert body[name] == [_pm(per["noise"]), _pm(per["mirror"]), _pm((per["noise"] + per["mirror"]) / 2)], name
