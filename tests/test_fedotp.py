"""FedOTP (algorithms/fedotp/): OT logits on patch features, the global prompt FedAvg'd and the
local one kept, dense features cached, identical at 1 and 3 ranks, exact resume, the quick-start."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pfedmoap import algorithms, config, ot, store
from pfedmoap.algorithms import fedotp
from pfedmoap.algorithms.base import ClientData, Setup, fedavg
from pfedmoap.algorithms.fedotp import method as fedotp_method
from pfedmoap.algorithms.fedotp.method import ot_options
from pfedmoap.clip.backbone import Backbone
from pfedmoap.clip.prompt import PromptEncoder
from pfedmoap.data import features
from pfedmoap.data.datasets import load_dataset
from pfedmoap.errors import PFedMoAPError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
N_CTX, WIDTH = 4, 64                      # tiny-clip's text width
P = N_CTX * WIDTH
SETS = ["algorithm=fedotp", "model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic",
        "data.n_clients=6", "data.n_train=300", "data.n_test=120", "data.min_size=5", "data.cache_dir=",
        "rounds=4", "train.local_epochs=2", "train.frac=0.5", "run.threads=1", "prompt.n_ctx=4",
        "run.checkpoint_every=2"]


# ---------------------------------------------------------------------------- config

def test_config_defaults_and_refusals():
    c = config.load(None, ["algorithm=fedotp"])
    f = c.options
    assert (f.method, f.eps, f.thresh, f.max_iter, f.top_percent, f.stop, f.n_prompts) == \
        ("cot", 0.1, 1e-3, 100, 0.8, "per_problem", 2)
    assert f.all_clients_first_round is True
    assert ot_options(f) == ot.OTOptions()
    assert fedotp.OT_METHODS == ot.METHODS and fedotp.OT_STOPS == ot.STOPS
    assert config.load(None, ["algorithm=fedotp", "fedotp.method=sinkhorn", "fedotp.stop=batch"]).options.stop == "batch"
    for bad, key in (("fedotp.eps=0", "fedotp.eps"), ("fedotp.top_percent=1.5", "fedotp.top_percent"),
                     ("fedotp.method=emd", "fedotp.method"), ("fedotp.stop=never", "fedotp.stop"),
                     ("fedotp.max_iter=0", "fedotp.max_iter"), ("fedotp.n_prompts=3", "fedotp.n_prompts"),
                     ("fedotp.thresh=-1", "fedotp.thresh")):
        with pytest.raises(PFedMoAPError, match=key.replace(".", r"\.")):
            config.load(None, ["algorithm=fedotp", bad])


# ---------------------------------------------------------------------------- the method in one process

@pytest.fixture(scope="module")
def method():
    cfg = config.load(None, SETS)
    backbone = Backbone("tiny-clip", "", seed=0)
    encoder = PromptEncoder(backbone, ["cat", "dog", "bird", "fish", "frog"], N_CTX)
    return algorithms.get("fedotp")(Setup(cfg, 4, encoder, backbone, (N_CTX, WIDTH)))


def _data(seed, n=24, n_test=10, M=6, D=128, C=5):
    g = torch.Generator().manual_seed(seed)
    dense = lambda k: torch.nn.functional.normalize(torch.randn(k, M, D, generator=g), dim=-1).half()  # noqa: E731
    return ClientData(torch.randn(n, D, generator=g), torch.randint(C, (n,), generator=g),
                      torch.randn(n_test, D, generator=g), torch.randint(C, (n_test,), generator=g),
                      train_dense=dense(n), test_dense=dense(n_test))


def test_declares_dense_features_and_uploads_only_the_global_prompt(method):
    assert algorithms.manifest("fedotp").data.dense and not algorithms.manifest("promptfl").data.dense
    a = method.arrays()
    assert [(x.name, x.width, x.dtype) for x in a.up] == [("prompt", P, "float32"), ("n_samples", 1, "float32")]
    assert sum(x.width * 4 for x in a.up) == 4 * (P + 1)
    assert [x.name for x in a.fit_down] == [x.name for x in a.eval_down] == ["global_prompt"]


def test_logits_are_the_ot_plan_on_patches_with_its_marginals(method, monkeypatch):
    client = method.client()
    state = client.init_state(0)
    seen = []
    real = fedotp_method.ot_logits

    def spy(patches, text, scale, options):
        logits, T = real(patches, text, scale, options, return_plan=True)
        seen.append((patches.detach(), text.detach(), T, logits.detach()))
        return logits

    monkeypatch.setattr(fedotp_method, "ot_logits", spy)
    data = _data(1)
    client.fit(state, data, 0, 0, {})
    assert len(seen) == 2                          # one batch of 24 images per epoch, 2 epochs
    patches, text, T, logits = seen[0]
    B, M, C, N = patches.shape[0], patches.shape[1], text.shape[1], text.shape[0]
    assert text.shape[0] == 2 and T.shape == (B, C, M, N)
    o = client.ot
    assert (o.method, o.top_percent) == ("cot", 0.8)
    # COT: every prompt receives top_percent / N, no patch sends more than 1 / M
    np.testing.assert_allclose(T.sum(2).numpy(), np.full((B, C, N), 0.8 / N), rtol=1e-4)
    assert (T.sum(3) <= 1 / M + 1e-4).all() and abs(float(T.sum((2, 3)).mean()) - 0.8) < 1e-4
    # logits = logit_scale * sum T * cos(patch, prompt): recomputed here by hand
    x = torch.nn.functional.normalize(patches.float(), dim=-1)
    sim = torch.einsum("bmd,ncd->bcmn", x, torch.nn.functional.normalize(text, dim=-1))
    np.testing.assert_allclose(logits.numpy(), (client.logit_scale * (T * sim).sum((2, 3))).numpy(), rtol=1e-5)

    # sinkhorn: balanced marginals
    seen.clear()
    client.ot = replace(o, method="sinkhorn", thresh=1e-7, max_iter=2000)
    client.evaluate(state, data, 0, 0, {"global_prompt": state.ctx.reshape(-1).numpy()})
    _, _, T, _ = seen[0]
    np.testing.assert_allclose(T.sum(2).numpy(), 0.5, rtol=1e-4)
    np.testing.assert_allclose(T.sum(3).numpy(), 1 / M, rtol=1e-3)


def test_pooled_features_do_not_enter(method):
    client = method.client()
    a, b = client.init_state(0), client.init_state(0)
    d1 = _data(2)
    d2 = replace(d1, train_x=torch.zeros_like(d1.train_x), test_x=-d1.test_x)
    ra, rb = client.fit(a, d1, 1, 0, {}), client.fit(b, d2, 1, 0, {})
    np.testing.assert_array_equal(ra["prompt"], rb["prompt"])
    down = {"global_prompt": ra["prompt"]}
    ea, eb = client.evaluate(a, d1, 1, 0, down), client.evaluate(b, d2, 1, 0, down)
    assert ea.loss == eb.loss and ea.accuracy == eb.accuracy
    # ... while the patch features do
    d3 = replace(d1, test_dense=torch.flip(d1.test_dense, dims=[0]))
    assert client.evaluate(a, d3, 1, 0, down).loss != ea.loss


def test_a_round_uploads_global_only_keeps_local_and_shares_the_global(method):
    server, client = method.server(), method.client()
    assert (server.participants(0) == np.arange(4)).all()          # round 0: everyone, as the reference
    assert len(server.participants(1)) == 2                        # then train.frac = 0.5
    states = {c: client.init_state(c) for c in range(4)}
    init_local = states[0].local.clone()
    assert not torch.equal(states[0].ctx, states[0].local)
    data = {c: _data(10 + c) for c in range(4)}
    for r in range(2):
        part = server.participants(r)
        down = server.configure_fit(r, part)
        assert (r == 0) == ("global_prompt" not in down)
        ups = []
        for c in part:
            d = {} if r == 0 else {"global_prompt": down["global_prompt"].row}
            if r:
                assert down["global_prompt"].to[c]
            before_local = states[c].local.clone()
            up = client.fit(states[c], data[c], r, int(c), d)
            assert set(up) == {"prompt", "n_samples"} and up["n_samples"] == [24]
            np.testing.assert_array_equal(up["prompt"], states[c].ctx.reshape(-1).numpy())   # the global one
            assert not torch.equal(states[c].local, before_local)                            # local trained...
            assert not np.allclose(up["prompt"], states[c].local.reshape(-1).numpy())       # ...and not sent
            ups.append(up)
        server.aggregate_fit(r, part, {k: np.array([u[k] for u in ups], np.float32) for k in ("prompt", "n_samples")})
        np.testing.assert_allclose(server.global_prompt, np.mean([u["prompt"] for u in ups], 0), rtol=1e-5, atol=1e-7)
        ev = server.configure_evaluate(r, np.ones(4, bool))
        assert ev["global_prompt"].to.all()
        for c in range(4):
            before = client.state_vector(states[c])
            res = client.evaluate(states[c], data[c], r, c, {"global_prompt": ev["global_prompt"].row})
            assert np.isfinite(res.loss)
            np.testing.assert_array_equal(client.state_vector(states[c]), before)   # evaluation keeps the state
    locals_ = [states[c].local for c in range(4)]
    assert all(not torch.equal(l, init_local) for l in locals_)
    assert not torch.equal(locals_[0], locals_[1])                # local prompts stay personal
    # the checkpoint holds both prompts, and restores them
    vec = client.state_vector(states[2])
    assert vec.shape == (2 * P,)
    fresh = client.init_state(2)
    client.load_state_vector(fresh, vec)
    assert torch.equal(fresh.ctx, states[2].ctx) and torch.equal(fresh.local, states[2].local)


# ---------------------------------------------------------------------------- dense features and their cache

def test_dense_cache_matches_compute_row_by_row(tmp_path):
    backbone = Backbone("tiny-clip", "", seed=0)
    ds = load_dataset(config.load(None, ["data.dataset=synthetic", "data.n_train=300", "data.n_test=40"]).data)
    split = ds.train
    M, D = features.dense_shape(backbone)
    assert (M, D) == (16, 128)
    idx = np.array([3, 7, 255, 256, 299])              # rows on both sides of a 256-image chunk
    x, dense = features.compute_dense(backbone, split, idx)
    assert dense.dtype == np.float16 and dense.shape == (5, M, D) and x.shape == (5, D)
    np.testing.assert_allclose(np.linalg.norm(dense.astype(np.float32), axis=-1), 1, atol=2e-3)
    np.testing.assert_allclose(x, features.compute(backbone, split)[idx], rtol=1e-5, atol=1e-6)
    key = features.cache_key(backbone, ds, "train", kind="dense")
    assert key != features.cache_key(backbone, ds, "train") == features.cache_key(backbone, ds, "train", None)
    path = features.cache_path(str(tmp_path), key)
    assert features.read_dense(path, len(split), (M, D), idx) is None
    features.write_dense(path, backbone, split)
    rx, rd = features.read_dense(path, len(split), (M, D), idx)
    np.testing.assert_array_equal(rx, x)
    np.testing.assert_array_equal(rd, dense)
    _, all_dense = features.compute_dense(backbone, split, np.arange(len(split)))
    np.testing.assert_array_equal(all_dense[idx], dense)     # a row never depends on the others asked for
    assert features.read_dense(path, len(split) + 1, (M, D), idx) is None
    assert not list(tmp_path.glob(".*tmp"))


def test_augmented_views_are_refused_in_one_line(tmp_path):
    p = _cli(tmp_path / "aug", sets=SETS + ["data.augment_views=2"], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.augment_views" in lines[0] and "fedotp" in lines[0], p.stderr


# ---------------------------------------------------------------------------- runs through the CLI

def _cli(out, ranks=0, sets=SETS, check=True, extra=()):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out), *extra]
    for s in sets:
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       env=ENV, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _read(run_dir):
    rounds = store.read_results(run_dir)["rounds"]
    with h5py.File(Path(run_dir) / "checkpoint.h5") as f:
        ckpt = {"state": f["clients/state"][()], "global": f["server/global_prompt"][()],
                "n_train": store.read_results(run_dir)["partition"]["n_train"]}
    return rounds, ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedotp")
    _cli(tmp / "r1")
    out = {0: _read(tmp / "r1")}
    if os.path.exists(MPIEXEC):       # 3 ranks, through the dense cache (rank 0 writes, each reads its rows)
        _cli(tmp / "r3", 3, SETS + [f"data.cache_dir={tmp / 'cache'}"])
        out[3] = _read(tmp / "r3")
        assert len(list((tmp / "cache").glob("features-*.h5"))) == 2
    return out


@pytest.mark.slow
def test_cli_run_counts_global_prompt_bytes_only(runs):
    rounds, ckpt = runs[0]
    part = rounds["participated"].astype(bool)
    assert part[0].all() and (part[1:].sum(1) == 3).all()
    np.testing.assert_array_equal(rounds["bytes_up"], np.where(part, 4 * (P + 1), 0))
    fit_down = np.where(part, 4 * P, 0)
    fit_down[0] = 0                                           # no global prompt before round 1
    np.testing.assert_array_equal(rounds["bytes_down"], fit_down + 4 * P)   # + the one for evaluation
    assert np.isfinite(rounds["accuracy"]).all() and np.isfinite(rounds["loss"]).all()
    state = ckpt["state"]
    assert state.shape == (6, 2 * P)
    # each client holds the global prompt as it last trained it (it takes the new one before it
    # next trains, not at evaluation); the last round's participants' copies FedAvg to the global
    last = np.flatnonzero(part[-1])
    np.testing.assert_allclose(fedavg(state[last, :P], ckpt["n_train"][last]), ckpt["global"], rtol=0, atol=1e-6)
    assert len({state[c, P:].tobytes() for c in range(6)}) == 6         # six personal local prompts


@pytest.mark.slow
def test_cli_identical_at_one_and_three_ranks(runs):
    if 3 not in runs:
        pytest.skip("no mpiexec beside the venv's python")
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(runs[0][0][k], runs[3][0][k], err_msg=k)
    for k in ("state", "global"):
        np.testing.assert_array_equal(runs[0][1][k], runs[3][1][k], err_msg=k)


@pytest.mark.slow
def test_stop_and_resume_is_exact(runs, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (out / "results.h5").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    with h5py.File(out / "checkpoint.h5") as f:
        assert 1 <= f.attrs["round"] < 4
    resume = [sys.executable, "-m", "pfedmoap.cli", "resume", str(out)]
    p = subprocess.run(([MPIEXEC, "-n", "3"] if os.path.exists(MPIEXEC) else []) + resume,
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got, ckpt = _read(out)
    ref, ref_ckpt = runs[0]
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    for k in ("state", "global"):
        np.testing.assert_array_equal(ckpt[k], ref_ckpt[k], err_msg=k)


@pytest.mark.slow
def test_quickstart_digits_micro_clip_runs_fedotp(tmp_path):
    """The default model (micro-clip, a ViT) on the embedded digits, one short round."""
    backbone = Backbone("micro-clip", "digits")
    features.check_dense(backbone)
    assert features.dense_shape(backbone) == (16, 128)
    sets = ["algorithm=fedotp", "rounds=1", "train.local_epochs=1", "data.n_clients=3", "data.cache_dir=",
            "run.threads=1", "run.progress=false"]
    p = _cli(tmp_path / "qs", sets=sets)
    acc = store.read_results(tmp_path / "qs")["rounds"]["accuracy"]
    assert acc.shape == (1, 3) and (acc > 0.2).all(), (acc, p.stdout[-1000:])   # chance is 0.1
