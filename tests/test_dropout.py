"""Client drop-out (issue 22, train.drop_rate): a sampled participant trains but its upload does not
arrive, with probability drop_rate, keyed by (seed, "drop", round, client). The server aggregates
what arrived; /rounds/dropped records who dropped; bytes count what moved; ε counts the released
uploads; a round where every participant dropped keeps the server's state; 1 and 3 ranks agree and a
resumed run ends as an uninterrupted one.

Seed 1 is used on purpose: its round 0 drops every participant (the case nothing has arrived yet),
later rounds drop some (checked below, so that a change of the draw shows up as such)."""
from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pfedmoap import algorithms, comm, config, dp, federation, rng, store
from pfedmoap.algorithms.base import sample_participants

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
TINY = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_train=200",
        "data.n_test=60", "data.min_size=5", "data.cache_dir=", "train.local_epochs=1", "run.threads=1",
        "prompt.n_ctx=4", "run.progress=false", "seed=1", "train.drop_rate=0.5"]
PROMPTFL = TINY + ["algorithm=promptfl", "data.n_clients=5", "rounds=3", "train.frac=1"]
PFEDMOAP = TINY + ["algorithm=pfedmoap", "data.n_clients=6", "rounds=4", "train.frac=0.5", "moe.n_experts=3"]
PROMPTFL_DP = TINY + ["algorithm=promptfl", "data.n_clients=6", "rounds=4", "train.frac=0.5", "dp.clip=1",
                      "dp.mechanism=upload", "dp.noise_multiplier=1", "run.checkpoint_every=1"]


def _cfg(sets):
    return config.load(None, list(sets), base=config.QUICKSTART)      # as `pfedmoap run` builds it


def _read(out):
    res = store.read_results(out)
    with h5py.File(out / store.RESULTS, "r") as f:
        res["dropped_attrs"] = dict(f["rounds"]["dropped"].attrs)
    return res


def test_drops_are_keyed_by_seed_round_and_client():
    ids = np.arange(40)
    a = rng.dropped(3, 2, ids, 0.3, 40)
    np.testing.assert_array_equal(a, rng.dropped(3, 2, ids, 0.3, 40))            # same key, same drops
    np.testing.assert_array_equal(a[ids[::-1]], rng.dropped(3, 2, ids[::-1], 0.3, 40)[ids[::-1]])  # order-free
    np.testing.assert_array_equal(a[:7], rng.dropped(3, 2, ids[:7], 0.3, 40)[:7])  # a client's draw is its own
    assert not np.array_equal(a, rng.dropped(3, 5, ids, 0.3, 40))                 # rounds differ
    assert not np.array_equal(a, rng.dropped(4, 2, ids, 0.3, 40))                 # seeds differ
    assert not rng.dropped(3, 2, ids[:10], 0.3, 40)[10:].any()                    # only participants drop
    assert 0 < a.sum() < 40
    assert not rng.dropped(3, 2, ids, 0.0, 40).any()                              # the default: nobody
    many = np.concatenate([rng.dropped(0, r, ids, 0.3, 40) for r in range(50)])
    assert abs(many.mean() - 0.3) < 0.05                                          # the rate, 2000 draws


def _spied_promptfl(out):
    """The promptfl run in this process, recording every client's upload (dropped or not) and what
    the server's aggregate_fit received and made."""
    fed = federation.Federation(_cfg(PROMPTFL), comm.LocalComm())
    ups, calls = {}, []
    fit_block = fed.client.fit_block

    def spy_fit(states, datas, round_, cids, downs):
        got = fit_block(states, datas, round_, cids, downs)
        for c, up in zip(cids, got):
            ups[(round_, c)] = {k: np.array(v, copy=True) for k, v in up.items()}
        return got
    fed.client.fit_block = spy_fit
    aggregate = fed.server.aggregate_fit

    def spy_aggregate(round_, participants, uploads):
        aggregate(round_, participants, uploads)
        calls.append((round_, participants.copy(), {k: v.copy() for k, v in uploads.items()},
                      fed.server.global_prompt.copy()))
    fed.server.aggregate_fit = spy_aggregate
    fed.run(out, "overwrite")
    return {"ups": ups, "calls": calls, "res": _read(out), "P": fed.build.method.setup.prompt_size}


@pytest.fixture(scope="module")
def promptfl(tmp_path_factory):
    return _spied_promptfl(tmp_path_factory.mktemp("drop") / "promptfl")


def test_the_server_aggregates_the_arrived_uploads_only(promptfl):
    rd = promptfl["res"]["rounds"]
    part, dropped = rd["participated"].astype(bool), rd["dropped"].astype(bool)
    assert part.all()                                      # frac 1: /rounds/participated is the sampled set
    want = np.stack([rng.dropped(1, r, np.arange(5), 0.5, 5) for r in range(3)])
    np.testing.assert_array_equal(dropped, want)
    assert dropped[0].all() and 0 < dropped[1].sum() < 5 and 0 < dropped[2].sum() < 5   # seed 1, see above
    # every participant trained, the dropped ones too (their upload was lost on the way)
    assert sorted(promptfl["ups"]) == [(r, c) for r in range(3) for c in range(5)]
    calls = promptfl["calls"]
    assert [r for r, *_ in calls] == [1, 2]                # round 0: nothing arrived, nothing aggregated
    for r, participants, uploads, global_prompt in calls:
        arrived = np.flatnonzero(~dropped[r])
        np.testing.assert_array_equal(participants, arrived)
        rows = np.stack([promptfl["ups"][(r, c)]["prompt"] for c in arrived])
        counts = np.array([promptfl["ups"][(r, c)]["n_samples"][0] for c in arrived], np.float64)
        np.testing.assert_array_equal(uploads["prompt"], rows)          # the arrived rows, in id order
        mean = (counts[:, None] * rows.astype(np.float64)).sum(0) / counts.sum()
        np.testing.assert_allclose(global_prompt, mean, rtol=1e-6, atol=1e-7)
        lost = np.stack([promptfl["ups"][(r, c)]["prompt"] for c in np.flatnonzero(dropped[r])])
        mean_all = (np.concatenate([rows, lost])).mean(0)
        assert not np.allclose(global_prompt, mean_all, atol=1e-6)       # the lost uploads are not in it


def test_results_record_the_drops_and_the_bytes_that_moved(promptfl):
    rd, P = promptfl["res"]["rounds"], promptfl["P"]
    dropped = rd["dropped"].astype(bool)
    assert rd["dropped"].dtype == bool and rd["dropped"].shape == (3, 5)
    attrs = promptfl["res"]["dropped_attrs"]
    assert attrs["units"] == "bool" and "did not arrive" in attrs["description"]
    np.testing.assert_array_equal(rd["bytes_up"], np.where(dropped, 0, 4 * P + 4))   # prompt + sample count
    # round 0 (everyone dropped) did not crash: every client evaluated with the common initial prompt
    assert np.isfinite(rd["accuracy"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in algorithms.names() if m not in ("promptfl", "pfedmoap")])
def test_a_first_round_where_everyone_drops_runs_for_every_method(method, tmp_path):
    # seed 1 drops clients 0-3 in round 0 at this rate; nothing ever arrived when they are evaluated
    sets = TINY + [f"algorithm={method}", "data.n_clients=4", "rounds=1", "train.frac=1"]
    assert rng.dropped(1, 0, np.arange(4), 0.5, 4).all()
    rd = _run(sets, tmp_path / method)["rounds"]
    # every participant dropped (zeroshot trains nobody: nobody to drop)
    np.testing.assert_array_equal(rd["dropped"], rd["participated"].astype(bool))
    assert (rd["bytes_up"] == 0).all() and np.isfinite(rd["accuracy"]).all()


def _run(sets, out):
    fed = federation.Federation(_cfg(sets), comm.LocalComm())
    fed.run(out, "overwrite")
    return store.read_results(out)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_one_and_three_ranks_drop_the_same_and_agree(tmp_path):
    one = _run(PFEDMOAP, tmp_path / "r1")["rounds"]
    ps = [sample_participants(1, r, 6, 0.5) for r in range(4)]
    want = np.stack([rng.dropped(1, r, p, 0.5, 6) for r, p in enumerate(ps)])
    np.testing.assert_array_equal(one["dropped"], want)
    assert one["dropped"].any() and not one["dropped"].all()
    args = [MPIEXEC, "-n", "3", sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(tmp_path / "r3")]
    for s in PFEDMOAP:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    three = store.read_results(tmp_path / "r3")["rounds"]
    for k in ("accuracy", "loss", "participated", "dropped", "experts", "gate_weight", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(three[k], one[k], err_msg=k)


@pytest.mark.slow
def test_resume_is_exact_and_epsilon_counts_the_released_uploads(tmp_path, monkeypatch):
    whole = _run(PROMPTFL_DP, tmp_path / "whole")
    rd = whole["rounds"]
    part, dropped = rd["participated"].astype(bool), rd["dropped"].astype(bool)
    assert dropped.any() and (part & ~dropped).any()
    released = (part & ~dropped).sum(1) / 6
    np.testing.assert_allclose(rd["dp_epsilon"], dp.Accountant(1.0, 1e-5, dp.ORDERS).curve(released), rtol=1e-12)
    # counting the sampled participants instead would report more
    assert rd["dp_epsilon"][-1] < dp.Accountant(1.0, 1e-5, dp.ORDERS).curve(part.sum(1) / 6)[-1]
    assert whole["attrs"]["dp_epsilon"] == pytest.approx(rd["dp_epsilon"][-1], rel=1e-12)   # planned = spent

    # stopped after round 2 (as on a signal), then resumed in a fresh federation
    out = tmp_path / "stopped"
    monkeypatch.setitem(federation._stop, "requested", False)
    fed = federation.Federation(_cfg(PROMPTFL_DP), comm.LocalComm())
    fit_block = fed.client.fit_block

    def stop_in_round_2(states, datas, round_, cids, downs):
        if round_ == 1:
            federation._stop["requested"] = True
        return fit_block(states, datas, round_, cids, downs)
    fed.client.fit_block = stop_in_round_2
    assert fed.run(out, "overwrite").status == "stopped"
    federation._stop["requested"] = False
    assert federation.Federation(_cfg(PROMPTFL_DP), comm.LocalComm()).run(out, "resume").status == "complete"
    got = store.read_results(out)["rounds"]
    for k in ("accuracy", "loss", "participated", "dropped", "bytes_up", "bytes_down", "dp_epsilon"):
        np.testing.assert_array_equal(got[k], rd[k], err_msg=k)
