"""Tables of the evaluation protocols (issue 22): `pfedmoap report --table` in the base-to-novel
layout (methods x data sets, each with Local / Base / Novel / HM, and their Average) and the
leave-one-domain-out layout (methods x held-out domains, and Avg), on results.h5 files written here
with h5py in the layout docs/hdf5-layout.md gives (the contract's names), every number checked
against a hand computation; and the packaged tables (tables.toml) in pFedMMA's setting.

The rendering through the real scripts on real runs is tests/test_mini_protocol_table.py."""
from __future__ import annotations

import csv
import dataclasses
import io
import re
import textwrap

import h5py
import numpy as np
import pytest

from pfedmoap import config, tables
from pfedmoap.analysis import paper_tables, report_table
from pfedmoap.data import disk

N, R = 3, 2          # clients, rounds
NAN = float("nan")
TABLES = """
seeds = [1, 2]

[tables.b2n]
title = "B2N test"
layout = "base2novel"
rows = [
    { name = "PromptFL", key = "promptfl", set = ["algorithm=promptfl"] },
    { name = "pFedMoAP", key = "pfedmoap", set = ["algorithm=pfedmoap"] },
    { name = "pFedPrompt", key = "pfedprompt", missing = "not implemented" },
]
columns = [{ name = "Pets", key = "pets" }, { name = "DTD_x", key = "dtd" }]

[tables.lodo]
title = "LODO test"
layout = "held_out"
rows = [{ name = "PromptFL", key = "promptfl", set = ["algorithm=promptfl"] }]
columns = [{ name = "Noisy", key = "noise" }, { name = "Mirror", key = "mirror" }]
"""


def write(path, seed, last: dict, protocol="base2novel", status="complete"):
    """A results.h5 of R rounds: `last` gives the last round's per-client rows (N,) of the named
    metrics (earlier rounds are other numbers, which no cell may read)."""
    path.mkdir(parents=True)
    cfg = textwrap.dedent(f"""\
        algorithm = "promptfl"
        seed = {seed}
        rounds = {R}
        [eval]
        protocol = "{protocol}"
        """)
    with h5py.File(path / "results.h5", "w") as f:
        f.attrs.update(schema_version=3, package_version="0", config=cfg, algorithm="promptfl", dataset="digits",
                       partition="pathological", seed=seed, world_size=1, start_time="2026-01-01T00:00:00",
                       n_clients=N, n_classes=10, n_rounds=R, rounds_done=R, status=status, eval_protocol=protocol)
        f.create_group("partition").attrs["classnames"] = [str(i) for i in range(10)]
        g = f.create_group("rounds")
        g["evaluated"] = np.ones((R, N), bool)
        for name, row in last.items():
            values = np.full((R, N), 0.01, np.float32)          # round 1: a decoy
            values[-1] = row
            g[name] = values
            g[name].attrs["units"] = "fraction"
            g[name].attrs["description"] = name


def b2n_values(seed: int, row: str, column: str) -> dict:
    """Distinct numbers per run; one client's Base is NaN (not evaluated) in some runs."""
    k = {"promptfl": 0.0, "pfedmoap": 0.1}[row] + {"pets": 0.0, "dtd": 0.05}[column] + 0.01 * seed
    base = np.array([0.5 + k, 0.6 + k, NAN if seed == 2 else 0.7 + k], np.float32)
    return {"accuracy": np.array([0.9 - k, 0.8, 0.85 + 2 * k], np.float32), "base_accuracy": base,
            "novel_accuracy": np.array([0.3 + k, 0.2 + 2 * k, 0.4], np.float32)}


def hand(values: dict) -> list[float]:
    """Local, Base, Novel, HM of one run, in percent, as the contract defines them."""
    local = float(np.mean(values["accuracy"].astype(np.float64)))
    base = float(np.nanmean(values["base_accuracy"].astype(np.float64)))
    novel = float(np.nanmean(values["novel_accuracy"].astype(np.float64)))
    return [100 * local, 100 * base, 100 * novel, 100 * 2 * base * novel / (base + novel)]


def fmt(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ptables")
    (tmp / "tables.toml").write_text(TABLES)
    out = tmp / "out"
    runs = {}
    for row in ("promptfl", "pfedmoap"):
        for column in ("pets", "dtd"):
            for seed in (1, 2):
                v = b2n_values(seed, row, column)
                write(out / "b2n" / column / row / f"seed{seed}", seed, v)
                runs[(row, column, seed)] = hand(v)
    # a run of the personal protocol in a cell's place: it has no Base / Novel, it is named and not counted
    write(out / "b2n" / "pets" / "pfedmoap" / "seed3", 3, {"accuracy": np.full(N, 0.99, np.float32)},
          protocol="personal")
    held = {}
    for column, base in (("noise", 0.4), ("mirror", 0.6)):
        for seed in (1, 2):
            row = np.array([base + 0.01 * seed, base + 0.1, NAN], np.float32)   # client 3: not evaluated
            write(out / "lodo" / column / "promptfl" / f"seed{seed}", seed,
                  {"accuracy": np.full(N, 0.9, np.float32), "held_out_accuracy": row},
                  protocol="leave_one_domain_out")
            held[(column, seed)] = 100 * float(np.nanmean(row.astype(np.float64)))
    return dict(tmp=tmp, out=out, runs=runs, held=held, file=str(tmp / "tables.toml"))


def _body(text: str) -> dict:
    lines = text.splitlines()
    return {(c := re.split(r"\s{2,}", line.strip()))[0]: c[1:] for line in lines[5:]
            if line and not line.startswith("note:")}


def test_base_to_novel_cells_are_the_hand_computed_means_over_seeds(tree):
    text = report_table("b2n", [str(tree["out"])], "table", tables_file=tree["file"])
    lines = text.splitlines()
    assert lines[0] == "B2N test" and lines[1].startswith("mean ± std over seeds 1, 2 of the mean over clients")
    header = re.split(r"\s{2,}", lines[3].strip())
    assert header == ["method"] + [f"{d} {p}" for d in ("Pets", "DTD_x", "Average")
                                   for p in ("Local", "Base", "Novel", "HM")]
    body = _body(text)
    assert body["pFedPrompt"] == ["n/a"] * 12
    for row, name in (("promptfl", "PromptFL"), ("pfedmoap", "pFedMoAP")):
        want = []
        for column in ("pets", "dtd"):
            per_seed = np.array([tree["runs"][(row, column, s)] for s in (1, 2)])    # (seeds, 4)
            want += [fmt(per_seed[:, j]) for j in range(4)]                        # HM: per run, then over seeds
        # Average: per seed the mean over the data sets of Local, Base, Novel; HM of those means
        avg = np.mean([[tree["runs"][(row, c, s)] for s in (1, 2)] for c in ("pets", "dtd")], axis=0)
        avg[:, 3] = 2 * avg[:, 1] * avg[:, 2] / (avg[:, 1] + avg[:, 2])
        want += [fmt(avg[:, j]) for j in range(4)]
        assert body[name] == want, name
    # HM is not the mean of the clients' harmonic means, nor the HM of the seed means
    run = tree["runs"][("promptfl", "pets", 1)]
    assert run[3] == pytest.approx(2 * run[1] * run[2] / (run[1] + run[2]))
    assert any(line.startswith("note: Pets / pFedMoAP: ") and "no /rounds/base_accuracy (eval.protocol = "
               "'personal'" in line and line.endswith("not counted") for line in lines), lines


def test_base_to_novel_csv_and_latex(tree):
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(
        report_table("b2n", [str(tree["out"])], "csv", tables_file=tree["file"])))}
    per_seed = np.array([tree["runs"][("pfedmoap", "dtd", s)] for s in (1, 2)])
    assert float(rows["pFedMoAP"]["DTD_x Novel_mean"]) == pytest.approx(per_seed[:, 2].mean(), abs=1e-4)
    assert float(rows["pFedMoAP"]["DTD_x HM_std"]) == pytest.approx(per_seed[:, 3].std(ddof=1), abs=1e-4)
    assert rows["pFedMoAP"]["Pets Local_n"] == "2"             # the personal-protocol run is not counted
    tex = report_table("b2n", [str(tree["out"])], "latex", tables_file=tree["file"])
    assert r"\begin{tabular}{l" + "c" * 12 + "}" in tex
    assert (r" & \multicolumn{4}{c}{Pets} & \multicolumn{4}{c}{DTD\_x} & \multicolumn{4}{c}{Average} \\"
            in tex.splitlines())
    assert r"\cmidrule(lr){2-5} \cmidrule(lr){6-9} \cmidrule(lr){10-13}" in tex.splitlines()
    assert "Method & " + " & ".join(["Local & Base & Novel & HM"] * 3) + r" \\" in tex.splitlines()
    moap = next(line for line in tex.splitlines() if line.startswith("pFedMoAP & "))
    cells = moap.removesuffix(r" \\").split(" & ")[1:]
    mine = np.array([tree["runs"][("pfedmoap", "pets", s)] for s in (1, 2)])
    assert cells[0] in (f"${mine[:, 0].mean():.2f} \\pm {mine[:, 0].std(ddof=1):.2f}$",
                        f"$\\mathbf{{{mine[:, 0].mean():.2f} \\pm {mine[:, 0].std(ddof=1):.2f}}}$")
    # pFedMoAP's numbers are the larger ones here (k + 0.1): bold in every Base and Novel column
    assert r"\mathbf" in cells[1] and r"\mathbf" in cells[2] and r"\mathbf" in cells[5]


def test_held_out_cells_and_their_average(tree):
    text = report_table("lodo", [str(tree["out"])], "table", tables_file=tree["file"])
    lines = text.splitlines()
    assert "held-out domain" in lines[1]
    assert re.split(r"\s{2,}", lines[3].strip()) == ["method", "Noisy", "Mirror", "Avg"]
    h = tree["held"]
    want = [fmt([h[("noise", s)] for s in (1, 2)]), fmt([h[("mirror", s)] for s in (1, 2)]),
            fmt([(h[("noise", s)] + h[("mirror", s)]) / 2 for s in (1, 2)])]
    assert _body(text)["PromptFL"] == want


def test_harmonic_mean_edges():
    assert paper_tables.harmonic_mean(0.0, 0.0) == 0.0
    assert np.isnan(paper_tables.harmonic_mean(NAN, 0.5))
    assert paper_tables.harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)


def test_a_table_with_a_seed_missing_marks_its_average(tree, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tree["out"] / "b2n", out / "b2n")
    shutil.rmtree(out / "b2n" / "dtd" / "promptfl" / "seed2")
    body = _body(report_table("b2n", [str(out)], "table", tables_file=tree["file"]))
    one = tree["runs"][("promptfl", "dtd", 1)]
    assert body["PromptFL"][4:8] == [f"{v:.2f}*" for v in one]            # one seed: no std, marked
    avg = (np.array(tree["runs"][("promptfl", "pets", 1)]) + np.array(one)) / 2
    assert body["PromptFL"][8] == f"{avg[0]:.2f}*"                        # the seed both data sets have


# ------------------------------------------------------------------------ the packaged tables

def test_packaged_base_to_novel_table_is_pfedmma_s_setting():
    t = tables.get("base2novel")
    assert t.layout == "base2novel"
    # pFedMMA's README names SUN397, Caltech101, OxfordPets, Flowers102, Food101, DTD, UCF101; these load here
    assert [c.name for c in t.columns] == ["Caltech101", "OxfordPets", "Flowers102", "Food101", "DTD"]
    paper = [r.name for r in tables.get("fewshot").rows]
    assert [r.name for r in t.rows if r.name in paper] == paper       # the paper's rows, in its order
    # and every method of the package: the field's later ones beside the paper's
    from pfedmoap import algorithms
    package = {m.name for m in algorithms.manifests()              # not a method a test registered
               if isinstance(m.implementation, str) and m.implementation.startswith("pfedmoap.algorithms.")}
    assert {spec.config("OUT").algorithm for spec in t.runs()} == package
    for spec in t.runs():
        cfg = spec.config("OUT")
        assert cfg.eval.protocol == "base2novel" and cfg.model.name == "ViT-B-16-quickgelu"
        assert cfg.model.pretrained == "openai"
        d = cfg.data
        assert (d.n_clients, d.partition, d.classes_per_client, d.shots) == (10, "pathological", 0, 16)
        if spec.row.key != "coop":              # CoOp's overlay trains every client alone, once
            assert cfg.train.frac == 1.0


HAS_PROTOCOL_KEYS = len(dataclasses.fields(config.EvalConfig)) > 1


@pytest.mark.parametrize("name, domains", [("lodo_domainnet", disk.DOMAINNET_DOMAINS),
                                           ("lodo_office_caltech10", disk.OFFICE_DOMAINS)])
def test_packaged_leave_one_domain_out_tables_hold_out_each_domain(name, domains):
    t = tables.get(name)
    assert t.layout == "held_out" and [c.key for c in t.columns] == list(domains)
    base = tables.get(name.removeprefix("lodo_"))
    n = 5 * (len(domains) - 1)              # 5 clients on each training domain, as the domain tables
    for column in t.columns:
        assert column.config == base.columns[0].config
        assert column.sets == ("eval.protocol=leave_one_domain_out", f"eval.held_out={column.key}",
                               f"data.n_clients={n}")
    if not HAS_PROTOCOL_KEYS:
        pytest.skip("eval.held_out comes with the protocols branch")
    for spec in t.runs():
        if spec.seed == 1:
            cfg = spec.config("OUT")
            assert cfg.eval.protocol == "leave_one_domain_out" and cfg.eval.held_out == spec.column.key
            assert cfg.data.clients_per_domain == 5 and cfg.data.n_clients == n
