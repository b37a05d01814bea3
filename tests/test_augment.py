"""Training augmentation (issue 14): data.augment = none | views | fresh.

"fresh" gives every training image a new random resized crop + flip per (round, local epoch), keyed
by (seed, image, round, epoch): identical at any number of ranks and on resume, precomputed outside
the training step (cached per client and round), equal to a direct computation. "none" is the
behaviour from before the key existed."""
from __future__ import annotations

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

from pfedmoap import config, rng
from pfedmoap.algorithms.base import ClientData
from pfedmoap.comm import LocalComm
from pfedmoap.data import features
from pfedmoap.errors import PFedMoAPError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=4",
        "data.n_train=160", "data.n_test=40", "data.min_size=5", "rounds=4", "train.local_epochs=2",
        "train.frac=0.75", "moe.n_experts=3", "run.threads=1", "algorithm=pfedmoap", "prompt.n_ctx=4",
        "run.checkpoint_every=1", "data.augment=fresh"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _args(cmd, out, sets, ranks=0):
    a = [sys.executable, "-m", "pfedmoap.cli", cmd, str(out)] if cmd == "resume" else \
        [sys.executable, "-m", "pfedmoap.cli", cmd, "--out", str(out)]
    for s in sets if cmd == "run" else ():
        a += ["--set", s]
    return [MPIEXEC, "-n", str(ranks)] + a if ranks else a


def _run(out, sets, ranks=0, cmd="run"):
    p = subprocess.run(_args(cmd, out, sets, ranks), capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _results(run_dir):
    with h5py.File(Path(run_dir) / "results.h5") as f:
        rounds = {k: f["rounds"][k][()] for k in ("accuracy", "loss", "participated")}
    with h5py.File(Path(run_dir) / "checkpoint.h5") as f:
        rounds["state"] = f["clients/state"][()]
    return rounds


def _same(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    base = tmp_path_factory.mktemp("aug1")
    return _run(base / "run", SETS + [f"data.cache_dir={base / 'cache'}"])


# ---------------------------------------------------------------------------- the views themselves

@pytest.fixture(scope="module")
def setup(tiny_backbone):
    from pfedmoap.data.datasets import load_dataset
    cfg = config.load(None, ["data.dataset=synthetic", "data.n_train=40", "data.n_test=10"])
    return tiny_backbone, load_dataset(cfg.data)


def test_a_view_is_keyed_by_seed_image_round_and_epoch(setup):
    backbone, ds = setup
    ids = np.array([3, 7, 11])
    v = {k: features.compute_fresh(backbone, ds.train, ids, 1, *k) for k in [(0, 0), (0, 1), (1, 0), (2, 3)]}
    np.testing.assert_array_equal(v[(0, 0)], features.compute_fresh(backbone, ds.train, ids, 1, 0, 0))
    keys = list(v)
    for i, a in enumerate(keys):          # every image differs in every other epoch and round
        for b in keys[i + 1:]:
            assert (np.abs(v[a] - v[b]).max(axis=1) > 1e-4).all(), (a, b)
    other_seed = features.compute_fresh(backbone, ds.train, ids, 2, 0, 0)
    assert (np.abs(other_seed - v[(0, 0)]).max(axis=1) > 1e-4).all()
    clean = features.compute(backbone, ds.train, ids)[ids]
    assert (np.abs(clean - v[(0, 0)]).max(axis=1) > 1e-4).all()
    # one image's view does not depend on which other images are encoded with it (up to rounding)
    alone = features.compute_fresh(backbone, ds.train, ids[1:2], 1, 2, 3)
    np.testing.assert_allclose(alone[0], v[(2, 3)][1], atol=1e-5)


def test_a_view_is_the_transform_under_its_key(setup):
    backbone, ds = setup
    i, r, e = 5, 3, 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.key(7, f"fresh-view/epoch{e}", r, i))
        image = features.train_transform(backbone)(ds.train.load(i))
    direct = backbone.encode_images(image[None]).numpy()[0]
    np.testing.assert_allclose(features.compute_fresh(backbone, ds.train, [i], 7, r, e)[0], direct, atol=1e-6)


def test_cached_blocks_equal_a_direct_computation(setup, tmp_path):
    backbone, ds = setup
    images = {0: np.array([9, 2, 30, 4]), 1: np.array([1, 5])}
    store = features.FreshViews(backbone, ds, images, seed=3, epochs=3, cache_dir=str(tmp_path))
    assert store.precompute(0, 2) and not store.precompute(0, 2)       # written once, then reused
    assert store.computed == 1
    path = store.path(0, 2)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    assert store.path(0, 3) != path and store.path(1, 2) != path
    for r, e in [(2, 0), (2, 2), (2, 1)]:
        got = store.features(0, r, e).numpy()
        np.testing.assert_array_equal(got, features.compute_fresh(backbone, ds.train, images[0], 3, r, e))
    assert store.computed == 1                       # read from the file, not recomputed
    # a fresh store (another process, another rank count) reads the same bits from the file
    again = features.FreshViews(backbone, ds, images, seed=3, epochs=3, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again.block(0, 2).numpy(), store.block(0, 2).numpy())
    assert again.computed == 0
    # another seed, or other images, is another file
    assert features.FreshViews(backbone, ds, images, 4, 3, str(tmp_path)).path(0, 2) != path
    assert features.FreshViews(backbone, ds, {0: images[0][::-1]}, 3, 3, str(tmp_path)).path(0, 2) != path
    # without a cache directory: computed when asked, the same numbers, one block held
    mem = features.FreshViews(backbone, ds, images, seed=3, epochs=3)
    assert mem.path(0, 2) is None and not mem.precompute(0, 2)
    np.testing.assert_array_equal(mem.features(0, 2, 1).numpy(), store.features(0, 2, 1).numpy())
    mem.features(1, 2, 0)
    assert mem._held[:2] == (1, 2) and mem.computed == 2
    # an epoch beyond train.local_epochs is encoded on demand with the same key
    np.testing.assert_array_equal(mem.features(0, 2, 5).numpy(),
                                  features.compute_fresh(backbone, ds.train, images[0], 3, 2, 5))


# ---------------------------------------------------------------------------- through a run

def _federation(tmp_path, sets):
    from pfedmoap.federation import Federation
    cfg = config.load(None, sets, base=config.QUICKSTART)     # as `pfedmoap run` without a config file
    return Federation(cfg, LocalComm())


@pytest.mark.slow
def test_build_precomputes_the_participants_rounds_and_fit_never_calls_the_image_tower(tmp_path):
    cache = tmp_path / "cache"
    fed = _federation(tmp_path, SETS + [f"data.cache_dir={cache}"])
    b = fed.build
    expected = sum(len(fed.method.server().participants(r)) for r in range(4))
    assert b.fresh.computed == expected == 3 * 4          # 4 rounds x 3 of 4 clients (frac 0.75)
    assert len(list((cache / "fresh-views").glob("views-*.h5"))) == expected
    # the features a client trains on are the precomputed ones, per (round, epoch)
    c = int(fed.method.server().participants(1)[0])
    ids = b.partition.train[c]
    for e in (0, 1):
        np.testing.assert_array_equal(b.data[c].train_features(1, e).numpy(),
                                      features.compute_fresh(b.backbone, b.dataset.train, ids, 1, 1, e))

    def boom(*a, **k):
        raise AssertionError("image tower called during training")
    b.backbone.model.encode_image = boom
    out = fed.run(tmp_path / "run")
    assert out.status == "complete"
    assert b.fresh.computed == expected                   # nothing encoded while training


@pytest.mark.slow
def test_without_a_cache_the_views_are_encoded_in_fit_and_give_the_same_run(tmp_path, one_rank):
    # the patch above is effective: without data.cache_dir the views are encoded when first asked
    fed = _federation(tmp_path, SETS + ["data.cache_dir="])
    assert fed.build.fresh.computed == 0

    def boom(*a, **k):
        raise RuntimeError("image tower called during training")
    real = fed.build.backbone.model.encode_image
    fed.build.backbone.model.encode_image = boom
    with pytest.raises(RuntimeError, match="image tower"):
        fed.run(tmp_path / "a")
    fed = _federation(tmp_path, SETS + ["data.cache_dir="])
    fed.build.backbone.model.encode_image = real
    fed.run(tmp_path / "b")
    _same(_results(tmp_path / "b"), _results(one_rank))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_fresh_views_identical_at_one_and_three_ranks(tmp_path, one_rank):
    three = _run(tmp_path / "run", SETS + [f"data.cache_dir={tmp_path / 'cache'}"], ranks=3)   # its own cache
    _same(_results(three), _results(one_rank))
    none = _run(tmp_path / "none", [s for s in SETS if not s.startswith("data.augment")] + ["data.cache_dir="])
    assert not np.array_equal(_results(none)["state"], _results(one_rank)["state"])   # augmentation changed training


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_stop_and_resume_at_another_rank_count_gives_the_same_views(tmp_path, one_rank):
    out = tmp_path / "run"
    sets = SETS + ["data.cache_dir=", "rounds=4"]          # no cache: every view recomputed after resuming
    proc = subprocess.Popen(_args("run", out, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "results.h5").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    with h5py.File(out / "results.h5") as f:
        assert f.attrs["status"] == "stopped" and f.attrs["rounds_done"] < 4
    _run(out, (), ranks=3, cmd="resume")
    _same(_results(out), _results(one_rank))


# ---------------------------------------------------------------------------- none and views unchanged

def test_none_and_views_draw_exactly_as_before():
    n, D, V = 12, 4, 3
    x = torch.randn(n, D)
    views = torch.randn(V, n, D)
    data = ClientData(x, torch.zeros(n, dtype=torch.long), x, torch.zeros(n, dtype=torch.long))
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state().clone()
    assert data.train_features(0, 0, gen) is x                            # none: the clean features,
    assert torch.equal(gen.get_state(), before)                           # and no draw from the batches' stream
    data.train_views = views
    old = torch.Generator().manual_seed(5)
    view = torch.randint(V, (n,), generator=old)                          # the selection before data.augment
    assert torch.equal(data.train_features(0, 0, gen), views[view, torch.arange(n)])
    assert torch.equal(gen.get_state(), old.get_state())


def test_augment_config():
    d = config.load(None, []).data
    assert (d.augment, d.augment_mode) == ("none", "none")
    assert config.load(None, ["data.augment_views=2"]).data.augment_mode == "views"     # older configs
    assert config.load(None, ["data.augment=views", "data.augment_views=2"]).data.augment_mode == "views"
    assert config.load(None, ["data.augment=fresh"]).data.augment_mode == "fresh"
    for bad, word in [(["data.augment=random"], "none, views or fresh"), (["data.augment=views"], "augment_views >= 1"),
                      (["data.augment=fresh", "data.augment_views=2"], "set it to 0")]:
        with pytest.raises(PFedMoAPError, match=word):
            config.load(None, bad)


def test_the_paper_configs_train_on_fresh_views():
    from pfedmoap.configs import find
    paper = sorted(Path(find("paper/food101")).parent.glob("*.toml"))
    assert len(paper) >= 10
    for p in paper:
        assert config.load(str(p), ["data.root="]).data.augment == "fresh", p.name


def test_dense_methods_refuse_fresh_views(tmp_path):
    with pytest.raises(PFedMoAPError, match="data.augment = 'fresh'.*fedotp"):
        _federation(tmp_path, [s for s in SETS if not s.startswith("moe.")] + ["algorithm=fedotp", "data.cache_dir="])
