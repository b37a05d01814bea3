"""Evaluation schedule (issue 16): run.eval_every and run.eval_clients decide whom each round
evaluates; /rounds/evaluated records it, NaN elsewhere; the last round evaluates every client; the
loop does no evaluation work (no evaluate call, no download) for the others; the report and the
figures read the gaps; the schedule is part of the run's identity."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pfedmoap import analysis, comm, config, federation, store
from pfedmoap.errors import PFedMoAPError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=6",
        "data.n_train=240", "data.n_test=120", "data.min_size=5", "data.cache_dir=", "rounds=7",
        "train.local_epochs=1", "train.frac=0.5", "moe.n_experts=3", "run.threads=1", "algorithm=pfedmoap",
        "prompt.n_ctx=4", "run.progress=false"]
SCHEDULE = ["run.eval_every=3", "run.eval_clients=participants"]
PER_CLIENT = ("accuracy", "macro_f1", "loss")


def test_who_is_evaluated():
    cfg = config.load(None, SCHEDULE)
    part = np.array([1, 0, 1, 0, 0], bool)
    got = np.stack([federation.evaluated_clients(cfg, r, 7, part) for r in range(7)])
    want = np.zeros((7, 5), bool)
    want[2] = want[5] = part                 # every 3rd round: its participants
    want[6] = True                           # the last round: every client
    np.testing.assert_array_equal(got, want)
    cfg = config.load(None, ["run.eval_every=2"])                       # eval_clients = all
    got = np.stack([federation.evaluated_clients(cfg, r, 5, part) for r in range(5)])
    assert got.all(1).tolist() == [False, True, False, True, True] and not got[[0, 2]].any()
    default = config.load(None, [])
    assert all(federation.evaluated_clients(default, r, 5, part).all() for r in range(5))


@pytest.mark.parametrize("sets, needle", [(["run.eval_every=0"], "run.eval_every = 0"),
                                          (["run.eval_clients=some"], "run.eval_clients = 'some'")])
def test_bad_schedules_are_one_clear_error(sets, needle):
    with pytest.raises(PFedMoAPError, match=needle):
        config.load(None, sets)


def test_the_schedule_is_part_of_the_run_identity():
    base, sched = config.load(None, []), config.load(None, SCHEDULE)
    assert federation.run_hash(base) == base.hash()                    # default: checkpoints as before
    assert federation.run_hash(sched) != base.hash() and sched.hash() == base.hash()
    assert federation.run_hash(config.load(None, ["run.eval_every=3"])) != federation.run_hash(sched)


def _run(out, extra=(), count=None):
    """One run in this process; `count` collects (round, client) of every evaluate call."""
    cfg = config.load(None, SETS + list(extra), base=config.QUICKSTART)   # as `pfedmoap run` builds it
    fed = federation.Federation(cfg, comm.LocalComm())
    if count is not None:
        evaluate = fed.client.evaluate

        def counted(state, data, round_, cid, down):
            count.append((round_, cid, sorted(down)))
            return evaluate(state, data, round_, cid, down)
        fed.client.evaluate = counted
    fed.run(out, "overwrite")
    return store.read_results(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    calls: list = []
    return {"every": _run(base / "every"), "sched": _run(base / "sched", SCHEDULE, calls), "calls": calls,
            "dir": base}


@pytest.mark.slow
def test_evaluated_clients_nan_elsewhere_and_the_last_round_full(runs):
    rd = runs["sched"]["rounds"]
    ev, part = rd["evaluated"], rd["participated"]
    assert ev.shape == (7, 6) and ev.dtype == bool
    np.testing.assert_array_equal(ev[[2, 5]], part[[2, 5]])             # rounds 3 and 6: participants
    assert not ev[[0, 1, 3, 4]].any() and ev[6].all()                   # nobody, then everyone
    for k in PER_CLIENT:
        assert np.isnan(rd[k][~ev]).all() and np.isfinite(rd[k][ev]).all(), k
    assert np.isnan(rd["domain_accuracy"][~ev]).all()
    assert np.isnan(rd["gate_weight"][~ev]).all()
    idle = ~(ev | part)                       # neither trained nor evaluated: no experts logged
    assert (rd["experts"][idle] == -1).all()
    # the default schedule evaluates every client every round, as before
    assert runs["every"]["rounds"]["evaluated"].all()


@pytest.mark.slow
def test_evaluation_work_is_skipped_for_the_others(runs):
    ev = runs["sched"]["rounds"]["evaluated"]
    calls = runs["calls"]
    assert sorted((r, c) for r, c, _ in calls) == sorted(zip(*np.nonzero(ev)))   # one call per evaluated client
    # downloads before evaluation go to evaluated clients only: a client neither training nor
    # evaluated receives nothing in that round
    rd = runs["sched"]["rounds"]
    idle = ~(ev | rd["participated"])
    assert (rd["bytes_down"][idle] == 0).all()
    assert (runs["every"]["rounds"]["bytes_down"][idle] > 0).any()      # which it did with the default


@pytest.mark.slow
def test_evaluated_values_equal_the_every_round_run(runs):
    """For pFedMoAP, evaluation changes nothing that is trained: the evaluated entries, the
    participation and the training traffic are those of the run that evaluates everyone."""
    got, ref = runs["sched"]["rounds"], runs["every"]["rounds"]
    ev = got["evaluated"]
    for k in PER_CLIENT:
        np.testing.assert_array_equal(got[k][ev], ref[k][ev], err_msg=k)
    np.testing.assert_array_equal(got["participated"], ref["participated"])
    np.testing.assert_array_equal(got["bytes_up"], ref["bytes_up"])
    np.testing.assert_array_equal(got["experts"][got["participated"]], ref["experts"][got["participated"]])


@pytest.mark.slow
def test_report_and_figures_read_the_gaps(runs, tmp_path):
    run = analysis.load_run(runs["dir"] / "sched")
    curve = run.accuracy_curve()
    assert np.isnan(curve[:6]).all() and np.isfinite(curve[6])          # only the last round is full
    partial = run.accuracy_curve(full_only=False)
    assert np.isfinite(partial[[2, 5, 6]]).all() and np.isnan(partial[[0, 1, 3, 4]]).all()
    acc = runs["sched"]["rounds"]["accuracy"]
    (row,) = analysis.summarize([run])
    assert row.acc_last.mean == pytest.approx(float(np.nanmean(acc[6])))
    assert row.acc_last5.mean == pytest.approx(float(np.nanmean(acc[6])))   # the one full round of the last 5
    assert row.best_round == 7
    text = analysis.report_main([str(runs["dir"] / "sched")], "table", str(tmp_path / "fig"))
    assert "complete" in text and "nan" not in text.lower()
    figures = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert any(n.startswith("accuracy_") for n in figures)
    # the method's own gating figure: drawn, or (weights near uniform) named as not drawn
    assert any(n.startswith("gating_") for n in figures) or "gating_sched.png not drawn: " in text
    # a run evaluating everyone is reported as before: last 5 = mean of the last 5 round means
    every = analysis.load_run(runs["dir"] / "every")
    (row,) = analysis.summarize([every])
    curve = np.nanmean(runs["every"]["rounds"]["accuracy"], axis=1)
    assert row.acc_last5.mean == pytest.approx(float(np.mean(curve[-5:])))


@pytest.mark.slow
def test_resuming_under_another_schedule_is_refused(runs):
    out = runs["dir"] / "sched"
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out), "--if-exists", "resume"]
    for s in SETS:                                     # the default schedule
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "different configuration" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_the_schedule_gives_the_same_results_at_3_ranks(runs, tmp_path):
    args = [MPIEXEC, "-n", "3", sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(tmp_path / "r3")]
    for s in SETS + SCHEDULE:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got, ref = store.read_results(tmp_path / "r3")["rounds"], runs["sched"]["rounds"]
    for k in (*PER_CLIENT, "evaluated", "participated", "experts", "gate_weight", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
