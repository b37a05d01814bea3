"""Post-hoc analysis: fake runs written with h5py straight from docs/hdf5-layout.md, read back by
pfedmoap.analysis; every number in the report is checked against the arrays written."""
from __future__ import annotations

import csv
import os
import io
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from pfedmoap.analysis import (Stat, expert_counts, format_table, load_run, mean_gate_weight,
                               report_main, summarize)
from pfedmoap.errors import PFedMoAPError

N, C, K = 4, 3, 3  # clients, classes, experts including the local one


def write_run(root, name, *, algorithm="pfedmoap", seed=0, n_rounds=6, rounds_done=None,
              status="complete", lr=0.002, schema_version=1):
    """A results.h5 as the layout describes it, with seeded random metrics; returns its arrays."""
    rounds_done = n_rounds if rounds_done is None else rounds_done
    rng = np.random.default_rng([seed, len(name)])
    r = rounds_done
    arrays = {
        "accuracy": rng.uniform(0.2, 0.9, (r, N)).astype(np.float32),
        "macro_f1": rng.uniform(0.1, 0.8, (r, N)).astype(np.float32),
        "loss": rng.uniform(0.5, 2.0, (r, N)).astype(np.float32),
        "participated": rng.random((r, N)) < 0.7,
        "experts": np.stack([[np.roll(np.arange(N), -(i + 1 + t % 2))[:K - 1] for i in range(N)]
                             for t in range(r)]).astype(np.int32).reshape(r, N, K - 1),
        "gate_weight": rng.dirichlet(np.ones(K), (r, N)).astype(np.float32),
        "bytes_up": rng.integers(1000, 5000, (r, N)).astype(np.int64),
        "bytes_down": rng.integers(1000, 9000, (r, N)).astype(np.int64),
        "phase_time": rng.random((r, 2, 3)).astype(np.float32),
        "wall_time": rng.random(r).astype(np.float32),
    }
    if r:
        arrays["experts"][0] = -1  # first round: no non-local expert yet
        arrays["gate_weight"][0, :, 1:] = np.nan
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = textwrap.dedent(f"""\
        algorithm = "{algorithm}"
        seed = {seed}
        out = "{run_dir}"
        [data]
        dataset = "digits"
        partition = "dirichlet"
        n_clients = {N}
        [train]
        lr = {lr}
        rounds = {n_rounds}
        """)
    with h5py.File(run_dir / "results.h5", "w") as f:
        f.attrs.update(schema_version=schema_version, package_version="0.1.0", config=config,
                       algorithm=algorithm, dataset="digits", partition="dirichlet", seed=seed,
                       world_size=2, start_time="2025-01-01T00:00:00", n_clients=N, n_classes=C,
                       n_rounds=n_rounds, rounds_done=rounds_done, status=status)
        part = f.create_group("partition")
        part.attrs["classnames"] = ["zero", "one", "two"]
        part["train_client"] = rng.integers(-1, N, 50).astype(np.int32)
        part["test_client"] = rng.integers(-1, N, 20).astype(np.int32)
        part["class_counts"] = rng.integers(0, 9, (N, C)).astype(np.int32)
        part["test_class_counts"] = rng.integers(0, 5, (N, C)).astype(np.int32)
        part["n_train"] = part["class_counts"][()].sum(axis=1).astype(np.int32)
        group = f.create_group("rounds")
        for key, value in arrays.items():
            group.create_dataset(key, data=value, maxshape=(None,) + value.shape[1:])
        group["phase_time"].attrs["phases"] = ["train", "exchange", "eval"]
    return arrays


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    arrays = {}
    for seed in (0, 1, 2):
        arrays[f"moap-s{seed}"] = write_run(root, f"moap-s{seed}", seed=seed)
    for seed in (0, 1):
        arrays[f"promptfl-s{seed}"] = write_run(root, f"promptfl-s{seed}", algorithm="promptfl",
                                                seed=seed)
    arrays["zeroshot"] = write_run(root, "zeroshot", algorithm="zeroshot", n_rounds=10,
                                   rounds_done=1)
    arrays["moap-lr"] = write_run(root, "moap-lr", seed=0, lr=0.01)
    arrays["moap-running"] = write_run(root, "moap-running", seed=3, rounds_done=2,
                                       status="running")
    write_run(root, "old-schema", schema_version=0)
    return root, arrays


def all_paths(root):
    return [str(root / name) for name in ("moap-s0", "moap-s1", "moap-s2", "promptfl-s0",
                                          "promptfl-s1", "zeroshot", "moap-lr", "moap-running",
                                          "old-schema")]


def client_mean(acc):
    return acc.astype(np.float64).mean(axis=1)


def rows_by(rows):
    return {(r.algorithm, r.variant, r.status): r for r in rows}


def test_load_run_reads_every_array_of_the_layout(runs_root):
    root, arrays = runs_root
    run = load_run(root / "moap-s1" / "results.h5")
    assert run.status == "complete" and run.n_done == 6 and run.seed == 1
    for key, value in arrays["moap-s1"].items():
        np.testing.assert_array_equal(run.rounds[key], value)
    assert run.rounds["phases"] == ["train", "exchange", "eval"]
    assert run.partition["classnames"] == ["zero", "one", "two"]
    assert run.config["train"]["lr"] == 0.002
    assert load_run(root / "moap-s1").path == run.path  # a run directory works as well


def test_seeds_of_one_config_are_grouped_as_mean_and_std(runs_root):
    root, arrays = runs_root
    rows = rows_by(summarize([load_run(p) for p in all_paths(root)]))
    row = rows[("pfedmoap", "train.lr=0.002", "complete")]
    assert row.seeds == (0, 1, 2) and len(row.paths) == 3
    curves = np.stack([client_mean(arrays[f"moap-s{s}"]["accuracy"]) for s in (0, 1, 2)])
    last, last5 = curves[:, -1], curves[:, -5:].mean(axis=1)
    assert row.acc_last.mean == pytest.approx(last.mean())
    assert row.acc_last.std == pytest.approx(last.std(ddof=1))
    assert row.acc_last5.mean == pytest.approx(last5.mean())
    assert row.acc_last5.std == pytest.approx(last5.std(ddof=1))
    best = int(curves.mean(axis=0).argmax())
    assert row.best_round == best + 1
    assert row.best_acc.mean == pytest.approx(curves[:, best].mean())
    f1 = [arrays[f"moap-s{s}"]["macro_f1"][-1].astype(np.float64).mean() for s in (0, 1, 2)]
    assert row.macro_f1.mean == pytest.approx(np.mean(f1))
    traffic = [(arrays[f"moap-s{s}"]["bytes_up"] + arrays[f"moap-s{s}"]["bytes_down"])
               .sum(axis=1).mean() for s in (0, 1, 2)]
    assert row.bytes_per_round == Stat(pytest.approx(np.mean(traffic)),
                                       pytest.approx(np.std(traffic, ddof=1)))


def test_single_runs_and_other_configs_stand_alone(runs_root):
    root, arrays = runs_root
    rows = rows_by(summarize([load_run(p) for p in all_paths(root)]))
    lr_row = rows[("pfedmoap", "train.lr=0.01", "complete")]
    assert lr_row.seeds == (0,) and lr_row.acc_last.std is None
    assert lr_row.acc_last.mean == pytest.approx(client_mean(arrays["moap-lr"]["accuracy"])[-1])
    zero = rows[("zeroshot", "", "complete")]
    assert (zero.rounds_done, zero.n_rounds, zero.best_round) == (1, 1, 1)
    assert zero.acc_last5.mean == pytest.approx(client_mean(arrays["zeroshot"]["accuracy"])[0])
    assert rows[("promptfl", "", "complete")].seeds == (0, 1)


def test_incomplete_and_other_schema_runs_are_reported_not_crashed_on(runs_root):
    root, arrays = runs_root
    rows = rows_by(summarize([load_run(p) for p in all_paths(root)]))
    running = rows[("pfedmoap", "train.lr=0.002", "running")]
    assert (running.seeds, running.rounds_done, running.n_rounds) == ((3,), 2, 6)
    assert running.acc_last.mean == pytest.approx(
        client_mean(arrays["moap-running"]["accuracy"])[-1])
    assert "moap-running" in running.note and "2 of 6" in running.note
    old = next(r for r in rows.values() if r.status.startswith("schema 0"))
    assert old.acc_last is None and "old-schema" in old.note
    text = format_table(list(rows.values()), "table")
    assert "note: " + str(root / "moap-running") in text and "schema_version 0" in text


def test_complete_status_with_missing_rounds_is_incomplete(tmp_path):
    write_run(tmp_path, "cut", rounds_done=3, status="complete")
    assert load_run(tmp_path / "cut").status == "incomplete"


def test_csv_has_the_numbers_in_file_units(runs_root):
    root, arrays = runs_root
    text = report_main(all_paths(root), fmt="csv")
    records = list(csv.DictReader(io.StringIO(text)))
    assert len(records) == 6
    moap = next(r for r in records if r["algorithm"] == "pfedmoap" and r["seeds"] == "0 1 2")
    curves = np.stack([client_mean(arrays[f"moap-s{s}"]["accuracy"]) for s in (0, 1, 2)])
    assert float(moap["acc_last_mean"]) == pytest.approx(curves[:, -1].mean())
    assert float(moap["acc_last_std"]) == pytest.approx(curves[:, -1].std(ddof=1))
    assert moap["n_runs"] == "3" and moap["runs"].count(";") == 2
    assert next(r for r in records if r["status"] == "running")["rounds_done"] == "2"


def test_markdown_and_table_show_percent_with_std(runs_root):
    root, arrays = runs_root
    last = np.stack([client_mean(arrays[f"promptfl-s{s}"]["accuracy"])[-1] for s in (0, 1)])
    expected = f"{100 * last.mean():.2f} ± {100 * last.std(ddof=1):.2f}"
    markdown = report_main(all_paths(root), fmt="markdown")
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 6 and table_lines[1].startswith("|---")
    assert len({line.count("|") for line in table_lines}) == 1  # same number of cells everywhere
    assert expected in next(line for line in table_lines if "promptfl" in line)
    table = report_main(all_paths(root))
    assert expected in next(line for line in table.splitlines() if line.startswith("promptfl"))


def test_unknown_format_is_a_user_error(runs_root):
    root, _ = runs_root
    with pytest.raises(PFedMoAPError, match="format: 'json'"):
        report_main(all_paths(root), fmt="json")


def test_plots_are_written_and_non_empty(runs_root, tmp_path):
    root, _ = runs_root
    text = report_main(all_paths(root), plot_dir=str(tmp_path / "figs"))
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == sorted(["accuracy_digits_dirichlet.png", "client_accuracy_digits_dirichlet.png"]
                           + [f"{kind}_{run}.png" for kind in ("experts", "gating")
                              for run in ("moap-s0", "moap-s1", "moap-s2", "moap-lr",
                                          "moap-running")])
    assert all((tmp_path / "figs" / n).stat().st_size > 1000 for n in names)
    assert f"{len(names)} figure(s) written" in text


def test_expert_counts_and_gate_weights_match_the_arrays(runs_root):
    root, arrays = runs_root
    run = load_run(root / "moap-s0")
    counts = expert_counts(run)
    experts = arrays["moap-s0"]["experts"]
    for i in range(N):
        for j in range(N):
            assert counts[i, j] == (experts[:, i, :] == j).sum()
    assert counts.trace() == 0 and counts.sum() == (experts >= 0).sum()
    weights = mean_gate_weight(run)
    assert weights.shape == (6, K) and np.isnan(weights[0, 1:]).all()
    np.testing.assert_allclose(weights[1:], arrays["moap-s0"]["gate_weight"][1:].mean(axis=1),
                               rtol=1e-6)


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.mkdir(), "no results.h5 in this directory"),
    (lambda p: None, "no such file or directory"),
    (lambda p: (p.mkdir(), (p / "results.h5").write_text("not hdf5")), "not an HDF5 file"),
    (lambda p: (p.mkdir(), h5py.File(p / "results.h5", "w").close()),
     "missing root attribute(s) schema_version"),
])
def test_a_path_that_is_not_a_run_is_one_clear_error(tmp_path, make, expected):
    path = tmp_path / "not-a-run"
    make(path)
    with pytest.raises(PFedMoAPError) as err:
        report_main([str(path)])
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_a_sweep_directory_error_says_to_pass_its_runs(tmp_path):
    write_run(tmp_path / "sweep", "a")
    with pytest.raises(PFedMoAPError, match=r"holds 1 run directories: pass them"):
        load_run(tmp_path / "sweep")


def test_a_run_held_open_by_its_writer_can_be_reported(tmp_path):
    write_run(tmp_path, "live", rounds_done=2, n_rounds=6, status="running")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'a');"
         "f['rounds/accuracy'].resize(3, axis=0); f.flush(); print('open', flush=True);"
         "sys.stdin.read(); f.close()", str(tmp_path / "live" / "results.h5")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        run = load_run(tmp_path / "live")
        assert run.status == "running" and run.n_done == 2  # the resized row is not counted
        assert all(len(v) == 2 for k, v in run.rounds.items() if k != "phases")
    finally:
        writer.communicate("", timeout=30)


def test_report_of_real_runs_matches_their_hdf5(tmp_path):
    """Two seeds of a real (tiny) run: the report's numbers are the files' numbers."""
    import subprocess
    import sys
    import h5py

    sets = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=3",
            "data.n_train=120", "data.n_test=60", "data.min_size=5", "data.cache_dir=", "rounds=2",
            "train.local_epochs=1", "algorithm=pfedmoap", "prompt.n_ctx=2", "moe.n_experts=2"]
    runs = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
        for s in sets + [f"seed={seed}"]:
            args += ["--set", s]
        p = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert p.returncode == 0, p.stderr[-2000:]
        runs.append(out)
    last = []
    for out in runs:
        with h5py.File(out / "results.h5") as f:
            last.append(f["rounds/accuracy"][-1].mean())
    csv = report_main([str(r) for r in runs], "csv")
    header, row = csv.strip().splitlines()[:2]
    fields = dict(zip(header.split(","), row.split(",")))
    assert float(fields["acc_last_mean"]) == pytest.approx(np.mean(last), abs=1e-6)
    assert float(fields["acc_last_std"]) == pytest.approx(np.std(last, ddof=1), abs=1e-6)
    plots = tmp_path / "fig"
    report_main([str(r) for r in runs], "table", str(plots))
    pngs = list(plots.glob("*.png"))
    assert any(p.name.startswith("experts_") for p in pngs) and all(p.stat().st_size > 0 for p in pngs)
