"""Invariants of every client partition: disjoint, covering, sized, seeded, clear errors."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pfedmoap.data.base import FederatedDataset, ImageSplit
from pfedmoap.data.partition import (
    Partition, apply_shots, make_partition, partition_summary, split_dirichlet,
    split_dirichlet_superclass, split_domain, split_iid, split_pathological,
)
from pfedmoap.errors import PFedMoAPError

C = 20
YTR = np.repeat(np.arange(C), 50)            # 1000 train images
YTE = np.repeat(np.arange(C), 10)            # 200 test images
DTR = np.arange(len(YTR)) % 4                # 4 domains, every class in every domain
DTE = np.arange(len(YTE)) % 4


def _dataset(superclass=None, domains=("a", "b", "c", "d")):
    rng = np.random.default_rng(0)
    ytr, yte = rng.permutation(YTR), rng.permutation(YTE)   # labels not sorted: indices must follow them
    return FederatedDataset("fake", [f"class {i}" for i in range(C)],
                            ImageSplit(None, ytr, DTR, None), ImageSplit(None, yte, DTE, None),
                            domain_names=list(domains), superclass=superclass)


def _cfg(**kw):
    base = dict(dataset="fake", root="", partition="dirichlet", n_clients=10, beta=0.5, min_size=10,
                shots=0, classes_per_client=0, domains=[], clients_per_domain=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _check_basic(p: Partition, n_train: int, n_test: int, n_clients: int):
    assert len(p.train) == len(p.test) == n_clients
    for split, n in ((p.train, n_train), (p.test, n_test)):
        for a in split:
            assert a.dtype == np.int64
            assert np.all(np.diff(a) > 0), "sorted and unique"
            if len(a):
                assert a.min() >= 0 and a.max() < n
        allidx = np.concatenate(split)
        assert len(allidx) == len(np.unique(allidx)), "disjoint across clients"


def _same(p, q):
    return all(np.array_equal(a, b) for a, b in zip(p.train + p.test, q.train + q.test))


# ------------------------------------------------------------------ iid

def test_iid_even_cover():
    p = split_iid(YTR, YTE, 7, seed=1)
    _check_basic(p, len(YTR), len(YTE), 7)
    assert sum(map(len, p.train)) == len(YTR) and sum(map(len, p.test)) == len(YTE)
    assert p.train_sizes().max() - p.train_sizes().min() <= 1
    assert p.test_sizes().max() - p.test_sizes().min() <= 1


def test_iid_seeds():
    assert _same(split_iid(YTR, YTE, 5, 3), split_iid(YTR, YTE, 5, 3))
    assert not _same(split_iid(YTR, YTE, 5, 3), split_iid(YTR, YTE, 5, 4))


def test_iid_too_many_clients():
    with pytest.raises(PFedMoAPError, match="n_clients"):
        split_iid(YTR[:3], YTE, 5, 0)


# ------------------------------------------------------------------ dirichlet

@pytest.mark.parametrize("beta", [0.1, 0.5, 100.0])
def test_dirichlet_invariants(beta):
    p = split_dirichlet(YTR, YTE, 10, beta, seed=0, min_size=10)
    _check_basic(p, len(YTR), len(YTE), 10)
    assert sum(map(len, p.train)) == len(YTR)         # train fully covered
    assert sum(map(len, p.test)) == len(YTE)          # every test image of a trained class assigned
    assert p.train_sizes().min() >= 10


def test_dirichlet_test_follows_train_shares():
    p = split_dirichlet(YTR, YTE, 5, 0.3, seed=2, min_size=5)
    for a, b in zip(p.train, p.test):
        tr = np.bincount(YTR[a], minlength=C) / 50.0
        te = np.bincount(YTE[b], minlength=C) / 10.0
        assert np.all(np.abs(tr - te) <= 0.1 + 1e-9)   # same share, up to rounding of 10 images
        assert set(np.flatnonzero(te)) <= set(np.flatnonzero(tr))


def test_dirichlet_skewed_and_seeded():
    p = split_dirichlet(YTR, YTE, 10, 0.1, seed=0, min_size=10)
    q = split_dirichlet(YTR, YTE, 10, 0.1, seed=0, min_size=10)
    r = split_dirichlet(YTR, YTE, 10, 0.1, seed=1, min_size=10)
    assert _same(p, q) and not _same(p, r)
    n_cls = [len(np.unique(YTR[a])) for a in p.train]
    assert min(n_cls) < C                              # low beta: label skew


def test_dirichlet_no_global_rng():
    np.random.seed(0)
    a = np.random.rand()
    np.random.seed(0)
    split_dirichlet(YTR, YTE, 10, 0.5, seed=0)
    assert np.random.rand() == a


def test_dirichlet_errors():
    with pytest.raises(PFedMoAPError, match="min_size"):
        split_dirichlet(YTR, YTE, 10, 0.5, seed=0, min_size=101)    # 10 x 101 > 1000
    with pytest.raises(PFedMoAPError, match="min_size"):
        split_dirichlet(YTR, YTE, 10, 0.01, seed=0, min_size=99)    # possible in size, never drawn
    with pytest.raises(PFedMoAPError, match="beta"):
        split_dirichlet(YTR, YTE, 10, 0.0, seed=0)
    with pytest.raises(PFedMoAPError, match="n_clients"):
        split_dirichlet(YTR, YTE, 0, 0.5, seed=0)


# ------------------------------------------------------------------ dirichlet-superclass

def test_dirichlet_superclass():
    sc = np.arange(C) % 4                               # 20 classes -> 4 super-classes
    p = split_dirichlet_superclass(YTR, YTE, sc, 6, 0.5, seed=0, min_size=10)
    _check_basic(p, len(YTR), len(YTE), 6)
    assert sum(map(len, p.train)) == len(YTR)
    # fine classes of one super-class share the client shares: the count of a client in each fine
    # class of the super-class is at most the super-class share (ceil) — check via super-class totals
    for a in p.train:
        tot = np.bincount(sc[YTR[a]], minlength=4)
        assert tot.sum() == len(a)
    q = split_dirichlet_superclass(YTR, YTE, sc, 6, 0.5, seed=0, min_size=10)
    assert _same(p, q)


def test_dirichlet_superclass_missing_map():
    with pytest.raises(PFedMoAPError, match="super-class"):
        split_dirichlet_superclass(YTR, YTE, None, 6, 0.5, seed=0)
    with pytest.raises(PFedMoAPError, match="super-class"):
        make_partition(_dataset(), _cfg(partition="dirichlet-superclass"), 0)


# ------------------------------------------------------------------ pathological

def test_pathological_blocks():
    p = split_pathological(YTR, YTE, 5, 3, seed=0, shots=4)
    _check_basic(p, len(YTR), len(YTE), 5)
    owned = []
    for a, b in zip(p.train, p.test):
        cls = np.unique(YTR[a])
        assert len(cls) == 3
        assert np.all(np.bincount(YTR[a])[cls] == 4)             # shots per owned class
        assert np.array_equal(np.unique(YTE[b]), cls)
        assert len(b) == 3 * 10                                  # all test images of the owned classes
        owned += cls.tolist()
    assert len(owned) == len(set(owned))                         # disjoint class blocks


def test_pathological_default_k_and_all_shots():
    p = split_pathological(YTR, YTE, 4, 0, seed=0)               # k = 20 // 4 = 5, all images
    assert all(len(np.unique(YTR[a])) == 5 and len(a) == 250 for a in p.train)


def test_pathological_seeded_class_shuffle():
    a = split_pathological(YTR, YTE, 5, 2, seed=0)
    b = split_pathological(YTR, YTE, 5, 2, seed=1)
    assert _same(a, split_pathological(YTR, YTE, 5, 2, seed=0))
    assert not _same(a, b)


def test_pathological_errors():
    with pytest.raises(PFedMoAPError, match="classes_per_client"):
        split_pathological(YTR, YTE, 5, 5, seed=0)               # 25 > 20
    with pytest.raises(PFedMoAPError, match="classes_per_client"):
        split_pathological(YTR, YTE, 21, 0, seed=0)              # 20 // 21 = 0


# ------------------------------------------------------------------ domain

def test_domain_one_client_per_domain():
    p = split_domain(YTR, DTR, YTE, DTE, 4, seed=0)
    _check_basic(p, len(YTR), len(YTE), 4)
    for d, (a, b) in enumerate(zip(p.train, p.test)):
        assert np.all(DTR[a] == d) and np.all(DTE[b] == d)
        assert len(a) == np.sum(DTR == d) and len(b) == np.sum(DTE == d)


def test_domain_dirichlet_inside_domain():
    p = split_domain(YTR, DTR, YTE, DTE, 8, seed=0, clients_per_domain=2, beta=0.5, min_size=5)
    _check_basic(p, len(YTR), len(YTE), 8)
    assert sum(map(len, p.train)) == len(YTR)
    for i, (a, b) in enumerate(zip(p.train, p.test)):
        assert np.all(DTR[a] == i // 2) and np.all(DTE[b] == i // 2)
        assert len(a) >= 5
    assert _same(p, split_domain(YTR, DTR, YTE, DTE, 8, 0, 2, 0.5, 5))
    assert not _same(p, split_domain(YTR, DTR, YTE, DTE, 8, 1, 2, 0.5, 5))


def test_domain_errors():
    with pytest.raises(PFedMoAPError, match="n_clients"):
        split_domain(YTR, DTR, YTE, DTE, 10, seed=0)
    with pytest.raises(PFedMoAPError, match="clients_per_domain"):
        split_domain(YTR, DTR, YTE, DTE, 4, seed=0, clients_per_domain=0)


def test_domain_subset_via_cfg():
    ds = _dataset()
    p = make_partition(ds, _cfg(partition="domain", n_clients=2, domains=["c", "a"]), 0)
    assert np.all(ds.train.domains[p.train[0]] == 2) and np.all(ds.train.domains[p.train[1]] == 0)
    with pytest.raises(PFedMoAPError, match="domains"):
        make_partition(ds, _cfg(partition="domain", n_clients=1, domains=["zzz"]), 0)


# ------------------------------------------------------------------ shots, make_partition

def test_apply_shots():
    p = split_dirichlet(YTR, YTE, 4, 1.0, seed=0)
    q = apply_shots(p, YTR, 2, seed=0)
    for a, b in zip(p.train, q.train):
        assert set(b) <= set(a)
        cnt_a, cnt_b = np.bincount(YTR[a], minlength=C), np.bincount(YTR[b], minlength=C)
        assert np.array_equal(cnt_b, np.minimum(cnt_a, 2))
    assert all(np.array_equal(x, y) for x, y in zip(p.test, q.test))
    assert apply_shots(p, YTR, 0, 0) is p
    with pytest.raises(PFedMoAPError, match="shots"):
        apply_shots(p, YTR, -1, 0)


@pytest.mark.parametrize("method,kw", [
    ("iid", {}), ("dirichlet", {}), ("pathological", {"classes_per_client": 2}),
    ("domain", {"n_clients": 4}), ("domain", {"n_clients": 8, "clients_per_domain": 2, "min_size": 5}),
    ("dirichlet-superclass", {}),
])
@pytest.mark.parametrize("shots", [0, 3])
def test_make_partition_all_methods(method, kw, shots):
    ds = _dataset(superclass=np.arange(C) % 5)
    cfg = _cfg(partition=method, shots=shots, **kw)
    p = make_partition(ds, cfg, seed=5)
    _check_basic(p, len(ds.train), len(ds.test), cfg.n_clients)
    if shots:
        for a in p.train:
            assert np.bincount(ds.train.labels[a]).max() <= shots
    assert _same(p, make_partition(ds, cfg, seed=5))
    assert not _same(p, make_partition(ds, cfg, seed=6)) or method == "domain" and cfg.clients_per_domain == 1 \
        and not shots
    s = partition_summary(p, ds)
    assert s.count("\n") == cfg.n_clients and "client 0" in s.replace("client  0", "client 0")


def test_make_partition_errors():
    ds = _dataset()
    with pytest.raises(PFedMoAPError, match="partition"):
        make_partition(ds, _cfg(partition="bogus"), 0)
    with pytest.raises(PFedMoAPError, match="n_clients"):
        make_partition(ds, _cfg(n_clients=0), 0)
    with pytest.raises(PFedMoAPError, match="domain"):
        make_partition(ds, _cfg(partition="domain", n_clients=3), 0)


def test_error_messages_one_line():
    for f in (lambda: split_iid(YTR[:2], YTE, 5, 0),
              lambda: split_dirichlet(YTR, YTE, 10, 0.5, 0, 200),
              lambda: split_pathological(YTR, YTE, 5, 5, 0),
              lambda: split_domain(YTR, DTR, YTE, DTE, 3, 0)):
        with pytest.raises(PFedMoAPError) as e:
            f()
        assert "\n" not in str(e.value)
