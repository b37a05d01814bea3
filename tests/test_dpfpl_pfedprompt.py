"""DP-FPL and pFedPrompt (issue 23): each method's defining property from arrays and bytes, 1 vs 3
ranks identical under mpiexec, and exact resume after a stop."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dp_accounting")

from pfedmoap import algorithms, config, dp, rng, store  # noqa: E402
from pfedmoap.algorithms.base import ClientData, Setup, fedavg  # noqa: E402
from pfedmoap.algorithms.dpfpl.method import (factorize, full_gradient, local_noise_multiplier,  # noqa: E402
                                              local_noise_std)
from pfedmoap.algorithms.pfedprompt.method import memory_logits  # noqa: E402
from pfedmoap.clip.prompt import PromptEncoder  # noqa: E402
from pfedmoap.errors import PFedMoAPError  # noqa: E402

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ROUNDS, N, N_CTX, WIDTH = 3, 6, 4, 64          # tiny-clip's text width is 64
P = N_CTX * WIDTH
BS = 8
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", f"data.n_clients={N}",
        "data.n_train=200", "data.n_test=60", "data.min_size=5", "data.cache_dir=", f"rounds={ROUNDS}",
        "train.local_epochs=1", f"train.batch_size={BS}", "train.frac=0.5", "run.threads=1",
        f"prompt.n_ctx={N_CTX}"]
EXTRA = {"dpfpl": ["dpfpl.noise=0.4", "dpfpl.rank=2", "dpfpl.lr=0.01"], "pfedprompt": []}


def _sets(method, *more):
    return [*SETS, f"algorithm={method}", *EXTRA[method], *more]


def _cli(out: Path, method: str, ranks: int = 0):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in _sets(method):
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]


def _read(run_dir: Path):
    res = store.read_results(run_dir)
    with h5py.File(run_dir / "checkpoint.h5") as f:
        ckpt = {"state": f["clients/state"][()], "global": f["server/global_prompt"][()]}
    return res, ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpfpl_pfedprompt")
    out = {}
    for m in EXTRA:
        _cli(tmp / f"{m}-r1", m)
        out[(m, 0)] = _read(tmp / f"{m}-r1")
        if os.path.exists(MPIEXEC):
            _cli(tmp / f"{m}-r3", m, 3)
            out[(m, 3)] = _read(tmp / f"{m}-r3")
    return out


# ---------------------------------------------------------------------------- DP-FPL: the pieces

def test_factorization_is_low_rank_plus_residual_and_exact():
    L = 0.02 * torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    u, v, r = factorize(L, 8, torch.Generator().manual_seed(1))
    assert u.shape == (16, 8) and v.shape == (8, 64) and r.shape == L.shape
    torch.testing.assert_close(u.t() @ u, torch.eye(8), atol=1e-5, rtol=0)       # orthonormal columns
    torch.testing.assert_close(v @ v.t(), torch.eye(8), atol=1e-5, rtol=0)       # orthonormal rows
    torch.testing.assert_close(u @ v + r, L, atol=1e-6, rtol=0)                  # L = U V + R
    assert torch.linalg.matrix_rank(u @ v) == 8
    # the same generator state, the same factors (the draws are keyed)
    u2, v2, _ = factorize(L, 8, torch.Generator().manual_seed(1))
    assert torch.equal(u, u2) and torch.equal(v, v2)


def _setup(tiny_backbone, method, *more):
    cfg = config.load(None, _sets(method, *more))
    enc = PromptEncoder(tiny_backbone, ["a", "b", "c"], N_CTX)
    return algorithms.get(method)(Setup(cfg, N, enc, tiny_backbone, (N_CTX, WIDTH))), cfg


def _data(n=BS, n_test=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n + n_test, 128, generator=g), dim=-1)
    y = torch.randint(0, 3, (n + n_test,), generator=g)
    return ClientData(x[:n], y[:n], x[n:], y[n:])


def test_dpfpl_local_step_is_the_projected_clipped_noisy_low_rank_gradient(tiny_backbone):
    """One local step (one batch): the local prompt moves by SGD along s (G_U V + U G_V + U U^T G_U V)
    of U's and V's gradients, each clipped to dpfpl.clip and noised with the keyed draws; the
    global prompt by its own gradient. The upload is the global prompt only."""
    method, cfg = _setup(tiny_backbone, "dpfpl", "dpfpl.clip=0.01")
    client, o = method.client(), method.options
    state, data, cid = client.init_state(2), _data(), 2
    g0, L0 = state.ctx.clone(), state.local.clone()
    up = client.fit(state, data, 0, cid, {})
    assert set(up) == {"prompt", "n_samples"} and np.array_equal(up["prompt"], state.ctx.reshape(-1).numpy())
    assert float(state.steps[0]) == 1
    # the same step by hand
    u, v, res = factorize(L0, client.rank, rng.torch_generator(cfg.seed, "dpfpl-factorize", 0, cid))
    g, u, v = (t.clone().requires_grad_(True) for t in (g0, u, v))
    perm = torch.randperm(BS, generator=rng.torch_generator(cfg.seed, "batches", 0, cid))
    x, y = data.train_x[perm], data.train_y[perm]
    loss = F.cross_entropy(client.logit_scale * x @ client.encoder(g + u @ v + res).t(), y)
    loss.backward()
    noise = rng.torch_generator(cfg.seed, "dpfpl-local-dp", 0, cid)
    std = local_noise_std(o, cfg)
    assert std > 0
    grads = []
    for t in (u, v):
        assert float(t.grad.norm()) > o.clip                        # the clip binds here
        grads.append(t.grad * (o.clip / t.grad.norm()) + torch.randn(t.shape, generator=noise) * std)
    step = full_gradient(u.detach(), v.detach(), *grads, o.grad_scale)
    lr, wd = o.lr, cfg.train.weight_decay
    torch.testing.assert_close(state.local, L0 - lr * (step + wd * L0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.ctx, g0 - lr * (g.grad + wd * g0), atol=1e-6, rtol=1e-5)


def test_dpfpl_global_prompt_stays_within_the_gradient_mechanisms_sensitivity(tiny_backbone):
    """dp.mechanism "gradient" on DP-FPL: the uploaded global prompt's per-step gradients are
    clipped to dp.clip, so it lies within C * S of the zero-gradient trajectory, S from DP-FPL's own
    recipe (dpfpl.lr, constant); the local prompt's DP is separate and does not loosen it."""
    C = 0.05
    method, cfg = _setup(tiny_backbone, "dpfpl", f"dp.clip={C}", "dp.noise_multiplier=0", "dpfpl.lr=0.5",
                         "train.local_epochs=3")
    client = method.client()
    n = 21                                   # 2 full batches of 8 per epoch
    state, data = client.init_state(0), _data(n=n)
    start = state.ctx.clone()
    client.fit(state, data, 0, 0, {})
    lrs = client.step_lrs(n)
    assert lrs == [0.5] * 6 and float(state.steps[0]) == 6
    t = cfg.train
    null = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([null], lr=0.5, momentum=t.momentum, weight_decay=t.weight_decay)
    for _ in lrs:
        null.grad = torch.zeros_like(null)
        opt.step()
    moved = float((state.ctx - null.detach()).norm())
    S = dp.gradient_sensitivity(lrs, t.momentum, t.weight_decay)
    assert 0 < moved <= C * S * (1 + 1e-4)


def test_dpfpl_without_local_dp_logs_no_epsilon_and_adds_no_noise(tiny_backbone):
    method, cfg = _setup(tiny_backbone, "dpfpl", "dpfpl.noise=0")
    client = method.client()
    assert local_noise_std(method.options, cfg) == 0
    state = client.init_state(0)
    client.fit(state, _data(), 0, 0, {})
    res = client.evaluate(state, _data(), 0, 0, {"global_prompt": state.ctx.reshape(-1).numpy()})
    assert math.isnan(res.logs["local_dp_epsilon"])


def test_dpfpl_evaluates_global_plus_local_and_its_global_model_alone(tiny_backbone):
    method, _ = _setup(tiny_backbone, "dpfpl")
    client = method.client()
    state, data = client.init_state(0), _data(n_test=40)
    client.fit(state, data, 0, 0, {})
    g = np.array(state.ctx.reshape(-1).numpy() + 0.01, np.float32)        # a new global prompt
    res = client.evaluate(state, data, 0, 0, {"global_prompt": g})
    with torch.no_grad():
        mine = client.encoder(torch.from_numpy(g).reshape(N_CTX, WIDTH) + state.local)
        glob = client.encoder(torch.from_numpy(g).reshape(N_CTX, WIDTH))
    np.testing.assert_array_equal(res.correct, ((data.test_x @ mine.t()).argmax(-1) == data.test_y).numpy())
    res_g = client.evaluate_global(state, data, 1, 0, {"global_prompt": g})
    np.testing.assert_array_equal(res_g.correct, ((data.test_x @ glob.t()).argmax(-1) == data.test_y).numpy())


def test_dpfpl_options_are_checked():
    for bad, msg in (("dpfpl.rank=0", r"dpfpl\.rank = 0: expected 1 to 4096"),
                     ("dpfpl.noise=-1", r"dpfpl\.noise = -1\.0: expected >= 0"),
                     ("dpfpl.clip=0", r"dpfpl\.clip = 0\.0: expected > 0")):
        with pytest.raises(PFedMoAPError, match=msg):
            config.load(None, _sets("dpfpl", bad))


# ---------------------------------------------------------------------------- pFedPrompt: the pieces

def test_memory_attention_weights_each_remembered_label():
    keys = F.normalize(torch.eye(3, 4), dim=-1)
    labels = torch.tensor([2, 0, 2])
    out = memory_logits(keys[:1], keys, labels, 3, beta=5.5)
    # attention exp(-beta (1 - cos)): 1 to itself, exp(-5.5) to the two orthogonal keys
    torch.testing.assert_close(out, torch.tensor([[math.exp(-5.5), 0.0, 1 + math.exp(-5.5)]]))
    # labels outside the class set (another set of class names) add nothing
    torch.testing.assert_close(memory_logits(keys[:1], keys, labels, 2, beta=5.5), torch.tensor([[math.exp(-5.5), 0.0]]))


def test_pfedprompt_personal_logits_are_the_global_prompt_plus_the_memory(tiny_backbone):
    method, cfg = _setup(tiny_backbone, "pfedprompt", "pfedprompt.alpha=2.0", "pfedprompt.beta=3.0")
    client = method.client()
    state, data = client.init_state(0), _data(n=30, n_test=40, seed=1)
    up = client.fit(state, data, 0, 0, {})
    assert set(up) == {"prompt", "n_samples"}
    assert len(client.state_vector(state)) == P                 # its state: the global prompt only
    g = state.ctx.reshape(-1).numpy()
    res = client.evaluate(state, data, 0, 0, {"global_prompt": g})
    with torch.no_grad():
        text = client.encoder(state.ctx)
    clip_logits = client.logit_scale * data.test_x @ text.t()
    att = torch.exp(-3.0 * (1 - data.test_x @ data.train_x.t()))
    want = clip_logits + 2.0 * att @ F.one_hot(data.train_y, 3).float()
    np.testing.assert_array_equal(res.correct, (want.argmax(-1) == data.test_y).numpy())
    res_g = client.evaluate_global(state, data, 1, 0, {"global_prompt": g})
    np.testing.assert_array_equal(res_g.correct, (clip_logits.argmax(-1) == data.test_y).numpy())
    assert (res.correct != res_g.correct).any()                # the memory changes predictions


# ---------------------------------------------------------------------------- runs: bytes, ranks, resume

@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXTRA))
def test_only_the_global_prompt_travels(runs, method):
    res, ckpt = runs[(method, 0)]
    rounds, part = res["rounds"], res["rounds"]["participated"].astype(bool)
    np.testing.assert_array_equal(rounds["bytes_up"], np.where(part, 4 * (P + 1), 0))
    fit_down = np.where(part, 4 * P, 0)
    fit_down[0] = 0                                             # no global prompt before round 1
    np.testing.assert_array_equal(rounds["bytes_down"], fit_down + 4 * P)    # + the one for evaluation
    assert np.isfinite(rounds["accuracy"]).all()
    state, n_train = ckpt["state"], res["partition"]["n_train"]
    last = np.flatnonzero(part[-1])
    np.testing.assert_allclose(fedavg(state[last, :P], n_train[last]), ckpt["global"], rtol=0, atol=1e-6)
    if method == "dpfpl":
        assert state.shape == (N, 2 * P + 1)
        assert len({state[c, P:2 * P].tobytes() for c in range(N)}) == N      # six personal local prompts
        # the local DP's epsilon: the client's local steps so far, each a Gaussian mechanism at z, q = 1
        steps = np.cumsum(part * (n_train // np.minimum(BS, n_train)), axis=0)
        np.testing.assert_array_equal(state[:, -1], steps[-1])
        cfg = config.load(None, _sets("dpfpl"))
        z = local_noise_multiplier(cfg.options, cfg)
        eps = rounds["local_dp_epsilon"]
        for r in range(ROUNDS):
            for c in range(N):
                want = dp.epsilon(z, 1.0, int(steps[r, c]), cfg.dp.delta, orders=dp.ORDERS) if steps[r, c] else 0.0
                assert eps[r, c] == pytest.approx(want, rel=1e-6)
    else:
        assert state.shape == (N, P)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXTRA))
def test_identical_at_one_and_three_ranks(runs, method):
    if (method, 3) not in runs:
        pytest.skip("no mpiexec beside the venv's python")
    (a, ca), (b, cb) = runs[(method, 0)], runs[(method, 3)]
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(a["rounds"][k], b["rounds"][k], err_msg=k)
    for k in ("state", "global"):
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXTRA))
def test_stop_and_resume_is_exact(runs, method, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in _sets(method, "run.checkpoint_every=0"):
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "results.h5").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    with h5py.File(out / "checkpoint.h5") as f:
        assert 1 <= f.attrs["round"] < ROUNDS
    resume = [sys.executable, "-m", "pfedmoap.cli", "resume", str(out)]
    # DP-FPL (keyed factorisation and noise draws, a step count in its state) resumes on 3 ranks;
    # pFedPrompt's state is the global prompt only: one process keeps the test cheap
    mpi = method == "dpfpl" and os.path.exists(MPIEXEC)
    p = subprocess.run(([MPIEXEC, "-n", "3"] if mpi else []) + resume,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (got, cg), (ref, cr) = _read(out), runs[(method, 0)]
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(got["rounds"][k], ref["rounds"][k], err_msg=k)
    for k in ("state", "global"):
        np.testing.assert_array_equal(cg[k], cr[k], err_msg=k)


def test_pfedprompt_memory_labels_follow_the_class_names():
    """Under other class names (base-to-novel's Novel, a cross-dataset target) the memory's labels
    are matched by name: a training class that is not evaluated adds nothing, a shared name keeps
    its memory under its new index."""
    from types import SimpleNamespace
    from pfedmoap.algorithms.pfedprompt.method import Client
    part = Client.__new__(Client)
    part.train_encoder = SimpleNamespace(classnames=["zero", "one", "two"])
    part.encoder = SimpleNamespace(classnames=["five", "two", "six"])
    labels = part._memory_labels(torch.tensor([0, 1, 2, 2]))
    assert labels.tolist() == [3, 3, 1, 1]       # 3 = C: adds nothing
    part.encoder = part.train_encoder
    assert part._memory_labels(torch.tensor([2, 0])).tolist() == [2, 0]
