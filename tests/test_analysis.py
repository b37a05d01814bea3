"""Post-hoc analysis: fake runs written with h5py straight from docs/hdf5-layout.md, read back by
pfedmoap.analysis; every number in the report is checked against the arrays written."""
from __future__ import annotations

import csv
import os
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfedmoap.algorithms.pfedmoap.figures import (expert_counts, expert_figure, gating_figure,
                                                  mean_gate_weight)
from pfedmoap.analysis import Stat, format_table, load_run, report_main, summarize
from pfedmoap.errors import PFedMoAPError

N, C, K = 4, 3, 3  # clients, classes, experts including the local one


def write_run(root, name, *, algorithm="pfedmoap", seed=0, n_rounds=6, rounds_done=None,
              status="complete", lr=0.002, schema_version=1, n_clients=N, k=K, beta=0.5, shots=0,
              frac=1.0, gate=None, experts=None):
    """A results.h5 as the layout describes it, with seeded random metrics; returns its arrays.
    Schema 2 writes `experts`/`gate_weight` only for pfedmoap (method-declared logs) and the
    phases comm, prepare, train, eval, write. `gate`: (R, N, K) gating weights, `experts`: (R, N, K-1) ids to write."""
    rounds_done = n_rounds if rounds_done is None else rounds_done
    rng = np.random.default_rng([seed, len(name)])
    r, N, K = rounds_done, n_clients, k  # noqa: N806 (the module's sizes, overridable)
    phases = ["train", "exchange", "eval"] if schema_version < 2 else [
        "comm", "prepare", "train", "eval", "write"]
    arrays = {
        "accuracy": rng.uniform(0.2, 0.9, (r, N)).astype(np.float32),
        "macro_f1": rng.uniform(0.1, 0.8, (r, N)).astype(np.float32),
        "loss": rng.uniform(0.5, 2.0, (r, N)).astype(np.float32),
        "participated": rng.random((r, N)) < 0.7,
        "experts": np.stack([[np.roll(np.arange(N), -(i + 1 + t % 2))[:K - 1] for i in range(N)]
                             for t in range(r)]).astype(np.int32).reshape(r, N, K - 1)
        if experts is None else experts.astype(np.int32),
        "gate_weight": (rng.dirichlet(np.ones(K), (r, N)) if gate is None else gate)
        .astype(np.float32),
        "bytes_up": rng.integers(1000, 5000, (r, N)).astype(np.int64),
        "bytes_down": rng.integers(1000, 9000, (r, N)).astype(np.int64),
        "phase_time": rng.random((r, 2, len(phases))).astype(np.float32),
        "wall_time": rng.random(r).astype(np.float32),
    }
    if r:
        arrays["experts"][0] = -1  # first round: no non-local expert yet
        arrays["gate_weight"][0, :, 1:] = np.nan
    if schema_version >= 2 and algorithm != "pfedmoap":
        del arrays["experts"], arrays["gate_weight"]
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
        beta = {beta}
        shots = {shots}
        [train]
        lr = {lr}
        rounds = {n_rounds}
        frac = {frac}
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
        group["phase_time"].attrs["phases"] = phases
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
    arrays["zeroshot"] = write_run(root, "zeroshot", algorithm="zeroshot", n_rounds=1)  # as written
    arrays["moap-lr"] = write_run(root, "moap-lr", seed=0, lr=0.01)
    arrays["moap-running"] = write_run(root, "moap-running", seed=3, rounds_done=2,
                                       status="running")
    write_run(root, "old-schema", schema_version=0)
    return root, arrays


def all_paths(root):
    return [str(root / name) for name in ("moap-s0", "moap-s1", "moap-s2", "promptfl-s0",
                                          "promptfl-s1", "zeroshot", "moap-lr", "moap-running",
                                          "old-schema")]


def label(name):
    from pfedmoap import algorithms
    return algorithms.manifest(name).label


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


@pytest.mark.slow
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
        with h5py.File(out / "results.h5") as f:  # the console's per-round line: percent
            percent = 100 * f["rounds/accuracy"][()].astype(np.float64).mean(axis=1)
        shown = [float(v) for v in re.findall(r"round \d+/2  mean accuracy (\d+\.\d\d)%  ",
                                              p.stdout + p.stderr)]
        assert shown == pytest.approx(percent, abs=0.006), (p.stdout + p.stderr)[-2000:]
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


# ------------------------------------------------------------------------ figures for papers

def _visible_ticks(axis):
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def _groups(paths):
    from pfedmoap.analysis import group_runs
    return group_runs([load_run(p) for p in paths])


def test_accuracy_figure_has_integer_rounds_a_named_band_and_the_setting(tmp_path):
    from pfedmoap.analysis import accuracy_figure, setting
    paths = [write_run(tmp_path, f"s{s}", seed=s, n_rounds=3, beta=0.1, shots=16, frac=0.3) and
             tmp_path / f"s{s}" for s in (0, 1, 2)]
    paths.append(write_run(tmp_path, "one", algorithm="promptfl", n_rounds=3, beta=0.1, shots=16,
                           frac=0.3) and tmp_path / "one")
    groups = _groups(paths)
    title = setting(groups[0].runs[0])
    assert title == "digits, dirichlet β=0.1, 16 shots, 4 clients (30% per round)"
    fig = accuracy_figure(groups, title)
    ax = fig.axes[0]
    ticks = _visible_ticks(ax.xaxis)
    assert ticks and all(float(t).is_integer() and t >= 1 for t in ticks), ticks
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"{label('pfedmoap')} (mean ± std over 3 seeds)" in labels
    assert f"{label('promptfl')} (seed 0)" in labels
    assert ax.get_title() == title


def test_titles_carry_the_setting_not_the_directory_name(tmp_path):
    """Two sweeps, each with a run in `seed0`: figures named apart, titles from the configs."""
    from pfedmoap.analysis import plot_runs, run_label, setting
    write_run(tmp_path / "sweep-a", "seed0", beta=0.1)
    write_run(tmp_path / "sweep-b", "seed0", beta=1.0)
    runs = [load_run(tmp_path / w / "seed0") for w in ("sweep-a", "sweep-b")]
    assert {setting(r) for r in runs} == {"digits, dirichlet β=0.1, 4 clients",
                                          "digits, dirichlet β=1, 4 clients"}
    assert run_label(runs[0]) == f"{label('pfedmoap')}, seed 0"            # the manifest's label
    fig = expert_figure(runs[0], f"{run_label(runs[0])}\n{setting(runs[0])}")
    assert fig.axes[0].get_title() == (f"expert selection: {label('pfedmoap')}, seed 0\n"
                                       "digits, dirichlet β=0.1, 4 clients")
    names = sorted(p.name for p in plot_runs(runs, tmp_path / "figs"))
    assert "accuracy_digits_dirichlet_dirichlet_beta0.1_4_clients.png" in names
    assert "accuracy_digits_dirichlet_dirichlet_beta1_4_clients.png" in names
    assert "experts_seed0.png" in names and "experts_seed0-2.png" in names


def test_expert_heatmap_stays_readable_with_many_clients(tmp_path):
    n, k, rounds = 40, 5, 5
    rng = np.random.default_rng(0)
    experts = np.stack([[rng.choice([j for j in range(n) if j != i], k - 1, replace=False)
                         for i in range(n)] for _ in range(rounds)])
    write_run(tmp_path, "many", n_clients=n, k=k, n_rounds=rounds, experts=experts)
    fig = expert_figure(load_run(tmp_path / "many"), "t")
    ax, bar = fig.axes
    assert not ax.texts, "per-cell labels on a 40 x 40 heatmap"
    assert bar.get_ylabel() == "rounds selected"
    for axis in (ax.xaxis, ax.yaxis):
        ticks = _visible_ticks(axis)
        assert 2 <= len(ticks) <= 10 and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_images()[0].get_clim() == (0, rounds)   # the colour scale is the rounds
    small = expert_figure(load_run(write_run(tmp_path, "few") and tmp_path / "few"), "t")
    assert len(small.axes[0].texts) == N * N  # small N keeps its counts in the cells


def test_expert_map_is_not_drawn_when_flat_at_k_equal_n(tmp_path):
    """K = N (the quick-start's 10 and 10): every client has all the others in every round with
    experts; the map would be one colour, so it is not drawn and the report says why."""
    n, rounds = 6, 5
    others = np.array([[j for j in range(n) if j != i] for i in range(n)])
    experts = np.broadcast_to(others, (rounds, n, n - 1)).copy()
    write_run(tmp_path, "flat", n_clients=n, k=n, n_rounds=rounds, experts=experts)
    reason = expert_figure(load_run(tmp_path / "flat"), "t")
    assert reason == "every client had every other client as an expert in 4 of 5 rounds (K = 6, N = 6): the map would be flat"
    text = report_main([str(tmp_path / "flat")], plot_dir=str(tmp_path / "figs"))
    assert "experts_flat.png not drawn: every client had every other client" in text
    assert not (tmp_path / "figs" / "experts_flat.png").exists()


def test_gating_figure_is_not_drawn_when_every_weight_is_near_uniform(tmp_path):
    """The quick-start: weights 0.097 to 0.103 at K = 10, no expert in round 1: ten lines on top of
    each other. Not drawn; the reason names the spread."""
    n, k, rounds = 12, 10, 6
    rng = np.random.default_rng(0)
    gate = 0.1 + rng.uniform(-2e-3, 2e-3, (rounds, n, k))
    write_run(tmp_path, "flat", n_clients=n, k=k, n_rounds=rounds, gate=gate,
              experts=np.tile(np.arange(1, k), (rounds, n, 1)))
    reason = gating_figure(load_run(tmp_path / "flat"), "t")
    assert isinstance(reason, str) and "within ±" in reason and "1/K = 1/10 (rounds 2-6)" in reason


def test_gating_figure_shows_weights_that_move_away_from_uniform(tmp_path):
    """A gate that learns: the local prompt's weight rises. Drawn from the first round with
    experts, y scaled to the weights (not [0, 1]), the legend outside the axes, 1/K dotted."""
    n, k, rounds = 5, 4, 6
    local = np.linspace(0.3, 0.6, rounds)[:, None, None]
    gate = np.concatenate([np.broadcast_to(local, (rounds, n, 1)),
                           np.broadcast_to((1 - local) / (k - 1), (rounds, n, k - 1))], axis=2)
    write_run(tmp_path, "moving", n_clients=n, k=k, n_rounds=rounds, gate=gate,
              experts=np.tile(np.arange(1, k), (rounds, n, 1)))
    fig = gating_figure(load_run(tmp_path / "moving"), "pFedMoAP, seed 0")
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["local", "expert 1", "expert 2", "expert 3", "uniform 1/K = 1/4"]
    assert ax.get_xlim() == (1.5, 6.5)           # round 1 had no expert (write_run): not drawn
    assert ax.get_ylim() == pytest.approx((0, 1.15 * 0.6))
    local_line = ax.get_lines()[0]
    np.testing.assert_allclose(local_line.get_ydata(), local[1:, 0, 0], rtol=1e-6)
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1   # outside
    assert all(float(t).is_integer() for t in _visible_ticks(ax.xaxis))


def test_methods_are_drawn_in_report_order_with_a_colour_each(tmp_path):
    """Report order and colours come from the manifests: every method its own colour (no two
    greys), rows in the README's order whatever the order of the paths."""
    from pfedmoap import algorithms
    from pfedmoap.analysis import accuracy_figure, group_runs
    names = [m.name for m in algorithms.manifests()]
    for name in reversed(names):
        write_run(tmp_path, name, algorithm=name, n_rounds=1 if algorithms.manifest(name).rounds == 1 else 4)
    groups = group_runs([load_run(tmp_path / name) for name in sorted(names, reverse=True)])
    assert [g.runs[0].algorithm for g in groups] == names
    fig = accuracy_figure(groups, "t")
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [f"{m.label} (seed 0)" for m in algorithms.manifests()]
    colours = [line.get_color() for line in ax.get_lines()]
    assert len(colours) == len(names) and len(set(colours)) == len(names)
    one_round = [m.name for m in algorithms.manifests() if m.rounds == 1]
    for line, name in zip(ax.get_lines(), names):     # a one-round method: a level across the axis
        assert (line.get_linestyle() == "--") == (name in one_round)


def test_box_labels_say_what_a_box_pools(tmp_path):
    """A box pools the final accuracies of every client of every seed: its label says so, not
    `mean ± std over seeds`."""
    from pfedmoap.analysis import client_accuracy_figure, group_runs
    for s in (0, 1):
        write_run(tmp_path, f"s{s}", seed=s)
    write_run(tmp_path, "fl", algorithm="promptfl")
    groups = group_runs([load_run(tmp_path / n) for n in ("s0", "s1", "fl")])
    ax = client_accuracy_figure(groups, "t").axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"{label('promptfl')}\n(4 clients, seed 0)", f"{label('pfedmoap')}\n(4 clients × 2 seeds)"]
    assert not any("±" in t for t in ticks)


def test_schema_2_runs_are_reported_and_plotted(tmp_path):
    """Schema 2: experts/gate_weight only where the method declares them (pfedmoap), the phases
    comm, prepare, train, eval, write; mixed with a schema 1 run."""
    for s in (0, 1):
        write_run(tmp_path, f"moap{s}", seed=s, schema_version=2)
        write_run(tmp_path, f"fl{s}", seed=s, algorithm="promptfl", schema_version=2)
    write_run(tmp_path, "old", algorithm="promptfl", seed=5, lr=0.5, schema_version=1)
    paths = [str(tmp_path / n) for n in ("moap0", "moap1", "fl0", "fl1", "old")]
    run = load_run(paths[2])
    assert "experts" not in run.rounds and run.rounds["phases"][-1] == "write"
    text = report_main(paths, plot_dir=str(tmp_path / "figs"))
    rows = [line for line in text.splitlines() if line.startswith(("pfedmoap", "promptfl"))]
    assert len(rows) == 3 and all("complete" in r for r in rows)
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert [n for n in names if n.startswith(("experts_", "gating_"))] == [
        "experts_moap0.png", "experts_moap1.png", "gating_moap0.png", "gating_moap1.png"]


def test_console_final_table_shows_percent():
    from types import SimpleNamespace
    from pfedmoap.cli import _final_table
    outcomes = [(SimpleNamespace(algorithm="pfedmoap", out="runs/a"),
                 SimpleNamespace(mean_accuracy=[0.5, 0.8125], domain_accuracy={"a": 0.25, "b": 1.0})),
                (SimpleNamespace(algorithm="zeroshot", out="runs/b"),
                 SimpleNamespace(mean_accuracy=[0.375], domain_accuracy={"a": 0.5, "b": 0.5}))]
    text = _final_table(outcomes)
    assert "mean client accuracy per round (%)" in text
    rows = {}
    for line in text.splitlines():
        if line.startswith(("pfedmoap", "zeroshot")):
            rows.setdefault(line.split()[0], []).append(line.split()[1:])
    assert rows["pfedmoap"] == [["50.00", "81.25"], ["25.00", "100.00"]], text
    assert rows["zeroshot"] == [["37.50", "37.50"], ["50.00", "50.00"]], text


@pytest.mark.parametrize("module", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "src" / "pfedmoap"
                                                           / "analysis").glob("*.py")))
def test_analysis_names_no_method(module):
    """Order, labels, colours, one-round methods and a method's own figures come from the manifests."""
    from test_layers import test_central_modules_name_no_method
    test_central_modules_name_no_method(f"analysis/{module}")
