"""pFedMMA: multi-modal adapters in both towers, only the shared projections travel.

The defining property is checked on a run traced in this process (the real round loop, the arrays
recorded as they move): what is uploaded is exactly the shared projections (and the sample count),
the towers' own adapters never leave a client, the download is the FedAvg of the uploads. The
image tower trains (the image features move with the adapters, the frozen features stay). The
towers' hooks are exact (no hook: open_clip's numbers; the text encoder's fast paths with a hook
equal its full path). Through the CLI with data.augment = "fresh": 1 process and mpiexec -n 3
identical; a run stopped by SIGUSR1 resumes exactly."""
from __future__ import annotations

import dataclasses
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

from pfedmoap import config, store
from pfedmoap.comm import LocalComm
from pfedmoap.federation import Federation

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ROUNDS, N = 3, 4
SETS = ["algorithm=pfedmma", "model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic",
        f"data.n_clients={N}", "data.n_train=96", "data.n_test=48", "data.min_size=5", "data.cache_dir=",
        f"rounds={ROUNDS}", "train.local_epochs=1", "train.batch_size=8", "train.frac=0.5", "run.threads=1",
        "pfedmma.lr=0.05", "pfedmma.scale=0.1"]       # large enough steps that every adapter visibly moves
FRESH = ["data.augment=fresh"]


class Trace:
    """A run in this process with the client part's fit and evaluate recorded."""

    def __init__(self, run_dir: Path, *extra):
        self.cfg = config.load(None, SETS + list(extra))
        fed = self.fed = Federation(self.cfg, LocalComm())
        self.fit, self.evaluate = [], []
        client = self.client = fed.client

        def snap(state):
            return {k: v.clone() for k, v in dataclasses.asdict(state).items()}

        def rec_fit(state, data, r, c, down, _f=client.fit):
            before = snap(state)
            up = _f(state, data, r, c, down)
            self.fit.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()}, before=before,
                                 after=snap(state), up={k: np.array(v) for k, v in up.items()}))
            return up

        def rec_eval(state, data, r, c, down, _f=client.evaluate):
            before = snap(state)
            res = _f(state, data, r, c, down)
            self.evaluate.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()},
                                      before=before, after=snap(state)))
            return res

        self.raw_fit = client.fit
        client.fit, client.evaluate = rec_fit, rec_eval
        fed.run(run_dir)
        self.rounds = store.read_results(run_dir)["rounds"]
        self.n_train = fed.build.n_train
        self.states, self.data = fed.states, fed.build.data

    def fits(self, r):
        return {e["c"]: e for e in self.fit if e["r"] == r}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return Trace(tmp_path_factory.mktemp("pfedmma") / "run")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().numpy().astype(np.float32).reshape(-1).tobytes()


# ---------------------------------------------------------------------------- what travels, what stays

@pytest.mark.slow
def test_only_the_shared_projections_travel(traced):
    m = traced.fed.method
    S = m.shared_size
    assert S == m.n_shared * (32 * 32 + 32) and m.n_shared == 2          # tiny-clip: 2 blocks per tower
    assert traced.fits(0).keys() == set(range(N))                         # round 0 trains every client
    for e in traced.fit:
        assert set(e["up"]) == {"shared", "n_samples"}
        assert e["up"]["shared"].tobytes() == _bytes(e["after"]["shared"])    # the shared rows, as trained
        assert e["up"]["n_samples"][0] == traced.n_train[e["c"]]
        ups = b"".join(v.tobytes() for v in e["up"].values())
        for part in ("text", "image"):                                    # the towers' adapters never leave
            assert _bytes(e["after"][part]) not in ups and e["after"][part].numel() > 0
    # bytes: a participant uploads S floats + its count, downloads S floats before training (after round 0)
    part = traced.rounds["participated"]
    np.testing.assert_array_equal(traced.rounds["bytes_up"], np.where(part, 4 * (S + 1), 0))


@pytest.mark.slow
def test_download_is_the_fedavg_of_the_shared_uploads_and_personal_parts_stay(traced):
    for r in range(1, ROUNDS):
        prev, now = traced.fits(r - 1), traced.fits(r)
        w = np.array([prev[c]["up"]["n_samples"][0] for c in sorted(prev)], np.float64)
        rows = np.stack([prev[c]["up"]["shared"] for c in sorted(prev)]).astype(np.float64)
        expect = (w[:, None] * rows).sum(0) / w.sum()
        for c, e in now.items():
            np.testing.assert_allclose(e["down"]["global_shared"], expect, rtol=1e-5, atol=1e-7)
            # training starts from its own last state for the towers' adapters
            last = max(x["r"] for x in traced.fit if x["c"] == c and x["r"] < r)
            own = traced.fits(last)[c]["after"]
            for part in ("text", "image"):
                assert torch.equal(e["before"][part], own[part])
    # ... and from the download for the shared rows: the same fit from a state with other shared
    # rows uploads the same bytes
    c, e = next(iter(traced.fits(1).items()))
    state = dataclasses.replace(traced.client.init_state(c), text=e["before"]["text"].clone(),
                                image=e["before"]["image"].clone())
    state.shared = state.shared + 1.0
    up = traced.raw_fit(state, traced.data[c], 1, c, e["down"])
    assert np.asarray(up["shared"]).tobytes() == e["up"]["shared"].tobytes()
    # the personal adapters differ between clients (each trained its own); the shared rows of the
    # last round's participants were all started from the same download
    last = traced.fits(ROUNDS - 1)
    a, b = sorted(last)[:2]
    assert not torch.equal(last[a]["after"]["image"], last[b]["after"]["image"])
    assert not torch.equal(last[a]["after"]["text"], last[b]["after"]["text"])


@pytest.mark.slow
def test_evaluation_uses_the_new_shared_rows_and_changes_no_state(traced):
    for e in traced.evaluate:
        for k in e["before"]:
            assert torch.equal(e["before"][k], e["after"][k]), k
        fits = {c: f for c, f in traced.fits(e["r"]).items()}
        assert "global_shared" in e["down"]
        if fits:    # the round's FedAvg reached every evaluated client
            w = np.array([f["up"]["n_samples"][0] for f in fits.values()], np.float64)
            rows = np.stack([f["up"]["shared"] for f in fits.values()]).astype(np.float64)
            np.testing.assert_allclose(e["down"]["global_shared"], (w[:, None] * rows).sum(0) / w.sum(),
                                       rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_the_image_tower_trains_and_the_frozen_features_stay(traced):
    client, fed = traced.client, traced.fed
    c = 0
    data, state = traced.data[c], traced.states[c]
    init = client.init_state(c)
    frozen = fed.build.backbone.encode_images(data.images.test)
    np.testing.assert_allclose(frozen.numpy(), data.test_x.numpy(), rtol=0, atol=1e-6)  # the frozen cache, unchanged
    with torch.no_grad():
        adapted = client.image_features(state.shared, state.image, data.images.test)
        start = client.image_features(init.shared, init.image, data.images.test)
    assert not torch.equal(state.image, init.image)
    assert (adapted - start).abs().max() > 1e-4                            # the image features moved
    assert (adapted - frozen).abs().max() > 1e-4
    # the adapters are the only thing that changed: with zero adapters the tower is the frozen one
    zero = client.hook(client.image_tower, torch.zeros_like(state.image), torch.zeros_like(state.shared))
    from pfedmoap.clip.adapters import encode_image
    with torch.no_grad():
        np.testing.assert_allclose(encode_image(fed.build.backbone, data.images.test, zero).numpy(), frozen.numpy(),
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- the towers' hooks

def test_no_hook_is_open_clips_numbers(tiny_backbone):
    from pfedmoap.clip.adapters import encode_image
    from pfedmoap.clip.prompt import PromptEncoder
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(encode_image(tiny_backbone, x).numpy(), tiny_backbone.encode_images(x).numpy())
    ident = lambda i, block, x_in, x_out: x_out     # noqa: E731
    with torch.no_grad():
        a = encode_image(tiny_backbone, x, ident)
    np.testing.assert_array_equal(a.numpy(), tiny_backbone.encode_images(x).numpy())
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    for shared in (True, False):
        enc = PromptEncoder(tiny_backbone, ["cat", "dog", "water lily"], 4, shared_prefix=shared)
        with torch.no_grad():
            np.testing.assert_array_equal(enc(ctx, hook=ident).numpy(), enc(ctx).numpy())


def test_text_fast_paths_with_adapters_equal_the_full_path(tiny_backbone):
    from pfedmoap.clip.prompt import PromptEncoder
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 64, generator=gen) * 0.1

    def hook(i, block, x_in, x_out):               # a per-token adapter on every block
        return x_out + torch.relu(block.ln_1(x_in) @ w) * (i + 1)
    ctx = torch.randn(4, 64, generator=gen) * 0.02
    names = ["cat", "dog", "water lily", "red panda"]
    full = PromptEncoder(tiny_backbone, names, 4, truncate=False, shared_prefix=False)
    with torch.no_grad():
        ref = full(ctx, hook=hook)
        assert (ref - full(ctx)).abs().max() > 1e-3                         # the hook matters
        for truncate, shared in ((True, True), (True, False), (False, True)):
            enc = PromptEncoder(tiny_backbone, names, 4, truncate=truncate, shared_prefix=shared)
            np.testing.assert_allclose(enc(ctx, hook=hook).numpy(), ref.numpy(), rtol=0, atol=2e-6)


def test_client_images_are_the_views_the_features_use(tiny_backbone):
    """The training views are the crops and flips of the cached features (same keys)."""
    from pfedmoap.data import features
    from pfedmoap.data.datasets import load_dataset
    cfg = config.load(None, SETS)
    ds = load_dataset(cfg.data)
    ids = np.array([3, 7, 11])
    fresh = features.ClientImages(tiny_backbone, ds, ids, ids[:1], seed=5, mode="fresh")
    np.testing.assert_allclose(tiny_backbone.encode_images(fresh.train(2, 1)).numpy(),
                               features.compute_fresh(tiny_backbone, ds.train, ids, 5, 2, 1), rtol=0, atol=1e-6)
    assert not torch.equal(fresh.train(2, 1), fresh.train(2, 0))            # a new view each epoch
    views = features.ClientImages(tiny_backbone, ds, ids, ids[:1], seed=5, mode="views", views=3)
    gen = torch.Generator().manual_seed(9)
    x = views.train(0, 0, gen)
    v = torch.randint(3, (len(ids),), generator=torch.Generator().manual_seed(9))
    for k, i in enumerate(ids):
        f = features.compute(tiny_backbone, ds.train, np.array([i]), view=int(v[k]))[i]
        np.testing.assert_allclose(tiny_backbone.encode_images(x[k:k + 1])[0].numpy(), f, rtol=0, atol=1e-6)
    clean = features.ClientImages(tiny_backbone, ds, ids, ids[:1], seed=5)
    np.testing.assert_allclose(tiny_backbone.encode_images(clean.train(0, 0)).numpy(),
                               features.compute(tiny_backbone, ds.train, ids)[ids], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- runs: ranks, resume, errors

def _cli(out: Path, ranks: int, *extra):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in SETS + FRESH + list(extra):
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return store.read_results(out)["rounds"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pfedmma-cli")
    ranks = (0, 3) if os.path.exists(MPIEXEC) else (0,)
    runs = {r: _cli(tmp / f"r{r}", r) for r in ranks}
    runs["dir"] = tmp / "r0"
    return runs


KEYS = ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down")


@pytest.mark.slow
def test_identical_at_one_and_three_ranks(cli_runs):
    if 3 not in cli_runs:
        pytest.skip("no mpiexec beside the venv's python")
    a, b = cli_runs[0], cli_runs[3]
    assert a["accuracy"].shape == (ROUNDS, N) and np.isfinite(a["accuracy"]).all()
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_stops_on_a_signal_and_resumes_exactly(cli_runs, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in SETS + FRESH + ["run.checkpoint_every=0"]:
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
        assert 1 <= f.attrs["round"] < ROUNDS
    resume = [sys.executable, "-m", "pfedmoap.cli", "resume", str(out)]
    if os.path.exists(MPIEXEC):
        resume = [MPIEXEC, "-n", "3", *resume]
    p = subprocess.run(resume, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = store.read_results(out)["rounds"]
    for k in KEYS:
        np.testing.assert_array_equal(got[k], cli_runs[0][k], err_msg=k)
    with h5py.File(out / "checkpoint.h5") as a, h5py.File(cli_runs["dir"] / "checkpoint.h5") as b:
        for k in ("clients/state", "server/shared"):
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)


@pytest.mark.parametrize("key, value, msg", [
    ("pfedmma.dim", "0", "pfedmma.dim = 0: expected >= 1"),
    ("pfedmma.scale", "0", "pfedmma.scale = 0.0: expected > 0"),
    ("data.augment_views", "2", None),       # views are fine: made from the images
])
def test_option_errors_are_one_line(key, value, msg):
    from pfedmoap.errors import PFedMoAPError
    if msg is None:
        config.load(None, SETS + [f"{key}={value}"])
        return
    with pytest.raises(PFedMoAPError, match=msg):
        config.load(None, SETS + [f"{key}={value}"])


def test_a_resnet_image_tower_is_refused_in_one_line():
    from types import SimpleNamespace
    from pfedmoap.clip.adapters import check_vit
    from pfedmoap.errors import PFedMoAPError
    fake = SimpleNamespace(name="RN50", model=SimpleNamespace(visual=torch.nn.Identity()))
    with pytest.raises(PFedMoAPError, match="model.name = 'RN50': algorithm = 'pfedmma' needs an open_clip ViT"):
        check_vit(fake, "algorithm = 'pfedmma'")
