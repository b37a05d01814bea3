"""The embedded `digits` benchmark: deterministic, disjoint halves, aligned domains, clear errors."""
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from pfedmoap.data import digits
from pfedmoap.data.datasets import available, load_dataset
from pfedmoap.errors import PFedMoAPError


def cfg(domains=()):
    return SimpleNamespace(dataset="digits", domains=list(domains))


def test_registered():
    assert "digits" in available()


def test_split_halves_disjoint_and_stratified():
    s = digits.split_indices()
    pre, tr, te = (set(s[k].tolist()) for k in ("pretrain", "train", "test"))
    assert not pre & tr and not pre & te and not tr & te
    assert len(pre | tr | te) == 1797
    assert len(s["pretrain"]) == 898 and len(s["train"]) == 630 and len(s["test"]) == 269
    _, labels = digits._raw()
    for part, frac in (("pretrain", 0.5), ("train", 0.35), ("test", 0.15)):
        counts = np.bincount(labels[s[part]], minlength=10)
        expected = np.bincount(labels, minlength=10) * frac
        assert np.all(np.abs(counts - expected) <= 1.5), (part, counts, expected)


def test_split_is_pinned():
    # The benchmark's definition: changing the split changes every published number.
    s = digits.split_indices()
    h = hashlib.sha256(b"".join(s[k].astype(np.int64).tobytes() for k in ("pretrain", "train", "test")))
    assert s["test"][:5].tolist() == SPLIT_TEST_HEAD, s["test"][:5].tolist()
    assert h.hexdigest()[:16] == SPLIT_SHA16, h.hexdigest()[:16]


SPLIT_TEST_HEAD = [0, 1, 9, 17, 22]
SPLIT_SHA16 = "89c74eb56aa38256"


def test_deterministic_rebuild():
    a = load_dataset(cfg())
    x1 = np.stack([np.asarray(a.test.load(i)) for i in range(0, len(a.test), 97)])
    for f in (digits._raw, digits.split_indices, digits._upscaled_all, digits.domain_images):
        f.cache_clear()
    b = load_dataset(cfg())
    x2 = np.stack([np.asarray(b.test.load(i)) for i in range(0, len(b.test), 97)])
    assert np.array_equal(x1, x2)
    assert np.array_equal(a.train.labels, b.train.labels) and a.train.keys == b.train.keys


def test_domains_aligned():
    ds = load_dataset(cfg())
    assert ds.name == "digits" and ds.n_classes == 10
    assert ds.classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                             "nine"]
    assert ds.domain_names == list(digits.DOMAINS)
    nd = len(digits.DOMAINS)
    for split, n in ((ds.train, 630), (ds.test, 269)):
        assert len(split) == nd * n
        assert np.array_equal(np.bincount(split.domains), np.full(nd, n))
        base = split.labels[split.domains == 0]
        for d in range(nd):
            assert np.array_equal(split.labels[split.domains == d], base)
        assert len(set(split.keys)) == len(split)
    im = ds.test.load(0)
    assert im.mode == "RGB" and im.size == (32, 32)
    # every shifted domain really differs from the original, image by image
    orig, _ = digits.federated_split("test", "original")
    for d in digits.DOMAINS[1:]:
        x, _ = digits.federated_split("test", d)
        assert x.shape == orig.shape and x.dtype == np.uint8
        assert (np.abs(x.astype(int) - orig).reshape(len(x), -1).max(1) > 0).all(), d


def test_pretraining_half_is_original_domain():
    x, y = digits.pretraining_half()
    assert x.shape == (898, 32, 32, 3) and x.dtype == np.uint8 and len(y) == 898
    assert np.array_equal(x[..., 0], x[..., 2])
    s = digits.split_indices()
    assert np.array_equal(x, digits.domain_images("original", tuple(s["pretrain"].tolist())))


def test_domain_subset_keeps_order():
    ds = load_dataset(cfg(["rotate", "original"]))
    assert ds.domain_names == ["rotate", "original"]
    assert len(ds.train) == 2 * 630 and set(ds.train.domains.tolist()) == {0, 1}
    assert ds.train.keys[0].startswith("digits/rotate/")
    x, _ = digits.federated_split("train", "rotate")
    assert np.array_equal(np.asarray(ds.train.load(0)), x[0])


@pytest.mark.parametrize("bad", [["sketch"], ["original", "original"]])
def test_bad_domains_error(bad):
    with pytest.raises(PFedMoAPError) as e:
        load_dataset(cfg(bad))
    msg = str(e.value)
    assert "\n" not in msg and "data.domains" in msg
    assert "'original', 'noise'" in msg          # the valid names
    if bad == ["sketch"]:
        assert "'sketch'" in msg
