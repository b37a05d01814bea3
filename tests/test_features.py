"""The image-feature cache: computed once per image and view, reused, independent of who asks."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pfedmoap import config
from pfedmoap.clip.backbone import Backbone
from pfedmoap.data import features
from pfedmoap.data.datasets import load_dataset


@pytest.fixture(scope="module")
def setup():
    cfg = config.load(None, ["data.dataset=synthetic", "data.n_train=300", "data.n_test=10"])
    return Backbone("tiny-clip", "", seed=0), load_dataset(cfg.data)


def test_features_do_not_depend_on_which_images_are_asked_for(setup):
    backbone, ds = setup
    full = features.compute(backbone, ds.train)
    some = np.array([3, 100])
    part = features.compute(backbone, ds.train, some)
    # Encoded in fixed chunks of the data set's order: the same bits whoever asks, and a chunk
    # nobody asked for is never computed.
    np.testing.assert_array_equal(part[some], full[some])
    assert not part[features.CHUNK:].any()
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)


def test_augmented_views_are_deterministic_and_differ_from_the_eval_view(setup):
    backbone, ds = setup
    idx = np.arange(20)
    v0 = features.compute(backbone, ds.train, idx, view=0)[idx]
    v0b = features.compute(backbone, ds.train, idx, view=0)[idx]
    v1 = features.compute(backbone, ds.train, idx, view=1)[idx]
    plain = features.compute(backbone, ds.train, idx)[idx]
    np.testing.assert_array_equal(v0, v0b)
    assert np.abs(v0 - v1).max() > 1e-3 and np.abs(v0 - plain).max() > 1e-3
    keys = {features.cache_key(backbone, ds, "train", v) for v in (None, 0, 1)}
    assert len(keys) == 3


def test_cache_file_is_written_once_and_reused(setup, tmp_path):
    backbone, ds = setup
    path = features.cache_path(str(tmp_path), features.cache_key(backbone, ds, "test"))
    assert features.read(path, len(ds.test), backbone.embed_dim) is None
    x = features.compute(backbone, ds.test)
    features.write(path, x)
    mtime = os.stat(path).st_mtime_ns
    np.testing.assert_array_equal(features.read(path, len(ds.test), backbone.embed_dim), x)
    assert features.read(path, len(ds.test) + 1, backbone.embed_dim) is None    # another data set: not reused
    assert os.stat(path).st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_key_names_the_weights(setup):
    backbone, ds = setup
    other = Backbone("tiny-clip", "", seed=1)        # same architecture, other random weights
    assert features.cache_key(backbone, ds, "train") != features.cache_key(other, ds, "train")
    assert features.cache_key(backbone, ds, "train") == features.cache_key(Backbone("tiny-clip", "", seed=0), ds, "train")
