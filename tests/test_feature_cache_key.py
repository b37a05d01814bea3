"""The feature cache's key covers where the images come from and what they hold, not just their names."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pfedmoap import config
from pfedmoap.clip.backbone import Backbone
from pfedmoap.data import features
from pfedmoap.data.base import ImageSplit
from pfedmoap.data.datasets import load_dataset
from pfedmoap.errors import PFedMoAPError


@pytest.fixture(scope="module")
def backbone():
    return Backbone("tiny-clip", "", seed=0)


def _cfg(dataset, root, **kw):
    base = dict(dataset=dataset, root=str(root), partition="iid", n_clients=2, beta=0.5, min_size=1,
                shots=0, classes_per_client=0, domains=[], clients_per_domain=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _make_dtd(root: Path):
    base = root / "dtd"
    js = {"train": [], "val": [], "test": []}
    for c in range(2):
        for part, n in (("train", 3), ("test", 2)):
            for k in range(n):
                rel = f"class_{c}/{part}_{k}.png"
                (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * c + 10 * k, 90, 200)).save(base / "images" / rel)
                js[part].append([rel, c, f"class_{c}"])
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps(js))
    return base


def _cached(backbone, ds, split, cache_dir, computed: list):
    """What federation does with data.cache_dir set: read the cache, or compute and write it."""
    path = features.cache_path(str(cache_dir), features.cache_key(backbone, ds, split))
    x = features.read(path, len(getattr(ds, split)), backbone.embed_dim)
    if x is None:
        computed.append(path)
        x = features.compute(backbone, getattr(ds, split))
        features.write(path, x)
    return x


def test_image_changed_in_place_is_recomputed(backbone, tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    base = _make_dtd(root)
    computed: list = []
    ds = load_dataset(_cfg("dtd", root))
    x0 = _cached(backbone, ds, "train", cache, computed)
    assert len(computed) == 1
    # loading the same root again reuses the cache
    ds = load_dataset(_cfg("dtd", root))
    key0 = features.cache_key(backbone, ds, "train")
    np.testing.assert_array_equal(_cached(backbone, ds, "train", cache, computed), x0)
    assert len(computed) == 1

    # rewrite one image in place: other pixels, a new mtime, same name
    img = base / "images" / "class_1" / "train_2.png"
    i = ds.train.keys.index("dtd/class_1/train_2.png")
    st = img.stat()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ds = load_dataset(_cfg("dtd", root))
    assert features.cache_key(backbone, ds, "train") != key0
    assert features.cache_key(backbone, ds, "test") == features.cache_key(backbone, load_dataset(_cfg("dtd", root)), "test")
    x1 = _cached(backbone, ds, "train", cache, computed)
    assert len(computed) == 2
    assert np.abs(x1[i] - x0[i]).max() > 1e-4                       # the new image's features
    others = np.arange(len(x0)) != i
    np.testing.assert_allclose(x1[others], x0[others], atol=1e-6)


def test_touched_image_of_the_same_size_changes_the_key(backbone, tmp_path):
    _make_dtd(tmp_path)
    ds = load_dataset(_cfg("dtd", tmp_path))
    key = features.cache_key(backbone, ds, "test")
    p = ds.test.files[0]
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert features.cache_key(backbone, ds, "test") != key


def test_same_layout_at_another_root_is_another_key(backbone, tmp_path):
    _make_dtd(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)   # same names, sizes, mtimes
    da, db = load_dataset(_cfg("dtd", tmp_path / "a")), load_dataset(_cfg("dtd", tmp_path / "b"))
    assert da.train.keys == db.train.keys
    assert [p.stat().st_mtime_ns for p in da.train.files] == [p.stat().st_mtime_ns for p in db.train.files]
    assert features.cache_key(backbone, da, "train") != features.cache_key(backbone, db, "train")
    # the root's identity is its resolved path: a symlink to the same root is the same data
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    dl = load_dataset(_cfg("dtd", tmp_path / "link"))
    assert features.cache_key(backbone, dl, "train") == features.cache_key(backbone, da, "train")


def test_missing_image_is_one_error_line(backbone, tmp_path):
    _make_dtd(tmp_path)
    ds = load_dataset(_cfg("dtd", tmp_path))
    ds.test.files[1].unlink()
    with pytest.raises(PFedMoAPError, match=r"test_1\.png: cannot stat") as e:
        features.cache_key(backbone, ds, "test")
    assert "\n" not in str(e.value)


def test_cifar_key_covers_the_batch_files(backbone, tmp_path):
    import pickle
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    def dump(name, labels, value=1):
        x = np.full((len(labels), 3072), value, np.uint8)
        (base / name).write_bytes(pickle.dumps({b"data": x, b"labels": labels}))
    for i in range(1, 6):
        dump(f"data_batch_{i}", [0, 1])
    dump("test_batch", [1, 0])
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    key = features.cache_key(backbone, load_dataset(_cfg("cifar10", tmp_path)), "train")
    assert key == features.cache_key(backbone, load_dataset(_cfg("cifar10", tmp_path)), "train")
    time.sleep(0.01)
    dump("data_batch_3", [0, 1], value=2)
    assert features.cache_key(backbone, load_dataset(_cfg("cifar10", tmp_path)), "train") != key


def test_in_memory_images_are_keyed_by_their_pixels(backbone):
    def synth(**kw):
        sets = [f"data.{k}={v}" for k, v in dict(dataset="synthetic", n_train=40, n_test=8, **kw).items()]
        return load_dataset(config.load(None, sets).data)
    # same names (0..39), other pixels: another key
    assert features.cache_key(backbone, synth(n_classes=4), "train") != \
        features.cache_key(backbone, synth(n_classes=5), "train")
    assert features.cache_key(backbone, synth(n_classes=4), "train") == \
        features.cache_key(backbone, synth(n_classes=4), "train")

    # a split with neither files nor an identity: its pixels are hashed
    images = np.zeros((3, 4, 4, 3), np.uint8)
    split = lambda: ImageSplit(lambda i: Image.fromarray(images[i]), [0, 1, 0])   # noqa: E731
    ds = SimpleNamespace(name="custom", train=split())
    k0 = features.cache_key(backbone, ds, "train")
    images[2, 1, 1, 0] = 9
    assert features.cache_key(backbone, SimpleNamespace(name="custom", train=split()), "train") != k0


def test_digits_key_is_stable(backbone):
    cfg = config.load(None, ["data.dataset=digits"]).data
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert features.cache_key(backbone, a, "test") == features.cache_key(backbone, b, "test")
