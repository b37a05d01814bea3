"""pFedMoAP's participation semantics (the paper's, and the earlier snapshot rule) and its ablations
(moe.lam = 0, a linear gate, an aggregated gate), each through the real loop; one process and
mpiexec -n 3 give the same results."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfedmoap import store

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
BASE = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=6",
        "data.n_train=360", "data.n_test=120", "data.min_size=5", "data.cache_dir=", "rounds=4",
        "train.local_epochs=1", "train.frac=0.34", "run.threads=1", "algorithm=pfedmoap",
        "prompt.n_ctx=4", "moe.n_experts=3", "moe.gating_dim=32", "moe.gating_heads=4"]
VARIANTS = {
    "paper": [],
    "snapshot": ["moe.participation=snapshot"],
    "lam0": ["moe.lam=0"],
    "linear": ["moe.gate=linear"],
    "aggregate": ["moe.aggregate_gate=true", "train.frac=1.0", "rounds=2"],
}


def _run(out: Path, sets, ranks=0):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in BASE + sets:
        args += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return store.read_results(out)["rounds"], store.read_checkpoint(out)[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moap")
    return {name: _run(tmp / name, sets) for name, sets in VARIANTS.items()}


@pytest.mark.slow
def test_paper_participation(runs):
    rounds, ckpt = runs["paper"]
    part, ex = rounds["participated"], rounds["experts"]
    assert (part.sum(1) == 2).all()                       # max(1, floor(0.34 * 6)) as the reference counts
    trained = np.zeros(6, bool)                           # has uploaded (is in the pool)
    gate = np.zeros(6, bool)                              # has trained with experts
    for r in range(4):
        for c in range(6):
            got = ex[r, c][ex[r, c] >= 0]
            if part[r, c] and not trained[c]:
                assert len(got) == 0, (r, c)              # a first-time participant trains without experts
            if part[r, c] and trained[c]:
                assert len(got) == min(2, trained.sum() - 1)   # routed on the pool at the round's start
            if not part[r, c] and not gate[c]:
                assert len(got) == 0, (r, c)              # evaluated without experts
        gate |= part[r] & (ex[r] >= 0).any(1)
        trained |= part[r]
        for c in np.flatnonzero(~part[r] & gate):         # routed on the pool after the uploads
            got = ex[r, c][ex[r, c] >= 0]
            assert len(got) == min(2, trained.sum() - 1) and trained[got].all()
    # a client that never trained is evaluated with the current global prompt: all such clients'
    # accuracies come from one prompt, so it matches across the clients' test splits' labels
    assert not np.isnan(rounds["accuracy"]).any()


@pytest.mark.slow
def test_never_trained_clients_use_the_global_prompt_not_their_initial_one(runs):
    paper, snap = runs["paper"][0], runs["snapshot"][0]
    never = ~np.cumsum(paper["participated"], 0).astype(bool)     # (R, N): not yet trained
    r, c = np.argwhere(never[1:])[0] + [1, 0]                       # a round after the first aggregation
    # under "snapshot" such a client keeps the shared random initial prompt; under "paper" it gets
    # the FedAvg prompt, which must classify differently
    assert paper["accuracy"][r, c] != snap["accuracy"][r, c] or paper["loss"][r, c] != snap["loss"][r, c]


@pytest.mark.slow
def test_snapshot_gives_every_client_experts_from_the_first_upload(runs):
    rounds, _ = runs["snapshot"]
    ex = rounds["experts"]
    assert (ex[0] == -1).all() and (ex[1:] >= 0).any(2).all()


@pytest.mark.slow
def test_lambda_zero_runs_and_differs(runs):
    lam0, paper = runs["lam0"][0], runs["paper"][0]
    assert np.isfinite(lam0["accuracy"]).all()
    np.testing.assert_array_equal(lam0["participated"], paper["participated"])
    assert not np.array_equal(lam0["loss"], paper["loss"])


@pytest.mark.slow
def test_linear_gate_weights_and_shapes(runs):
    rounds, ckpt = runs["linear"]
    gw = rounds["gate_weight"]
    has = (rounds["experts"] >= 0).sum(2)
    for r, c in np.argwhere(has == 2):
        np.testing.assert_allclose(np.nansum(gw[r, c]), 1.0, rtol=1e-5)
    # client state: ctx (4 x 64) + linear gate (32 x 3 + 3) + its momentum (same)
    assert ckpt["clients/state"].shape == (6, 4 * 64 + 2 * (32 * 3 + 3))


def test_linear_gate_gradients():
    from pfedmoap.clip.gating import LinearGate, moe_logits
    torch.manual_seed(0)
    gate = LinearGate(128, 32, 4)
    x = torch.nn.functional.normalize(torch.randn(5, 128), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 7, 128), dim=-1)      # K = 3 of the 4 available
    mixed, w = gate(x, text)
    assert mixed.shape == (5, 7, 32) and w.shape == (5, 7, 3)
    np.testing.assert_allclose(w.sum(-1).detach().numpy(), 1.0, rtol=1e-6)
    logits, _ = moe_logits(gate, x, text, 10.0, 0.5)
    logits.logsumexp(-1).sum().backward()
    assert gate.score.weight.grad[:3].abs().sum() > 0
    assert gate.score.weight.grad[3].abs().sum() == 0          # the unused expert slot gets no gradient


@pytest.mark.slow
def test_aggregated_gate_is_identical_across_clients_after_a_round(runs):
    rounds, ckpt = runs["aggregate"]
    state = ckpt["clients/state"]
    P = 4 * 64
    G = (state.shape[1] - P) // 2
    gating = state[:, P:P + G]
    assert np.ptp(gating, axis=0).max() == 0                     # every client holds the FedAvg gate
    assert ckpt["server/global_gating"].shape == (G,)
    np.testing.assert_array_equal(gating[0], ckpt["server/global_gating"])
    P4 = 4 * P
    # participants upload prompt + sample count + gating; everyone downloads the global gate to evaluate
    np.testing.assert_array_equal(rounds["bytes_up"][1], np.full(6, P4 + 4 + 4 * G))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
@pytest.mark.parametrize("name", ["paper", "aggregate"])
def test_variants_identical_at_three_ranks(runs, tmp_path, name):
    rounds, _ = _run(tmp_path / name, VARIANTS[name], ranks=3)
    for k in ("accuracy", "loss", "experts", "gate_weight", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(rounds[k], runs[name][0][k], err_msg=k)
