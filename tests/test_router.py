"""Expert selection (router.route) and the round's participants (algorithms.base.sample_participants)."""
from __future__ import annotations

import numpy as np
import pytest

from pfedmoap import router
from pfedmoap.algorithms.base import sample_participants

METHODS = ("knn", "random", "fixed")


def _pool(N=10, P=6, trained=(3, 7, 9), seed=0):
    rng = np.random.default_rng(seed)
    pool = np.zeros((N, P), np.float32)
    in_pool = np.zeros(N, bool)
    pool[list(trained)] = rng.normal(size=(len(trained), P))
    in_pool[list(trained)] = True
    return pool, in_pool


def _route(method, pool, in_pool, clients, n, seed=1, round_=0, queries=None):
    clients = np.asarray(clients)
    if queries is None:
        # as the federation does: a client's own latest prompt, or a stand-in for one never uploaded
        queries = np.where(in_pool[clients][:, None], pool[clients], pool[in_pool].mean(0))
    return router.route(method, pool, in_pool, queries, clients, n, seed, round_)


@pytest.mark.parametrize("method", METHODS)
def test_client_ids_never_self_never_untrained_padded(method):
    pool, in_pool = _pool()
    clients = np.arange(10)
    out = _route(method, pool, in_pool, clients, 5)
    assert out.shape == (10, 5) and out.dtype == np.int32
    for i, c in enumerate(clients):
        chosen = out[i][out[i] >= 0]
        assert c not in chosen
        assert set(chosen.tolist()) <= {3, 7, 9}               # ids, not positions 0..2 in the pool
        assert len(set(chosen.tolist())) == len(chosen)        # no duplicates
        expect = {3, 7, 9} - {int(c)}
        # fewer trained clients than n: all of them, then -1 padding
        assert set(chosen.tolist()) == expect
        assert (out[i, :len(expect)] >= 0).all() and (out[i, len(expect):] == -1).all()


@pytest.mark.parametrize("method", METHODS)
def test_enough_trained_clients_fills_every_slot(method):
    trained = (0, 2, 3, 5, 6, 8, 11)
    pool, in_pool = _pool(N=12, trained=trained)
    out = _route(method, pool, in_pool, np.arange(12), 4)
    assert (out >= 0).all()
    for c in range(12):
        assert c not in out[c] and set(out[c].tolist()) <= set(trained)
        assert len(set(out[c].tolist())) == 4


@pytest.mark.parametrize("method", METHODS)
def test_empty_pool_and_zero_experts(method):
    pool, in_pool = _pool(trained=())
    assert (_route(method, pool, in_pool, np.arange(10), 3, queries=np.zeros((10, 6))) == -1).all()
    pool, in_pool = _pool()
    out = _route(method, pool, in_pool, np.arange(10), 0)
    assert out.shape == (10, 0)


@pytest.mark.parametrize("method", METHODS)
def test_only_trained_client_is_itself(method):
    pool, in_pool = _pool(trained=(4,))
    out = _route(method, pool, in_pool, np.array([4, 5]), 2)
    assert (out[0] == -1).all()
    assert out[1].tolist() == [4, -1]


def test_knn_returns_truly_nearest_brute_force():
    rng = np.random.default_rng(3)
    N, P, n = 15, 8, 4
    trained = np.array([0, 1, 2, 4, 5, 8, 9, 10, 12, 14])
    pool = np.zeros((N, P), np.float32)
    pool[trained] = rng.normal(size=(len(trained), P))
    in_pool = np.zeros(N, bool)
    in_pool[trained] = True
    clients = np.arange(N)
    queries = pool.copy()
    queries[~in_pool] = rng.normal(size=((~in_pool).sum(), P))   # never uploaded: compared by another prompt
    out = router.route("knn", pool, in_pool, queries, clients, n, 0, 0)
    for c in clients:
        cand = [j for j in trained if j != c]
        dist = {j: float(np.linalg.norm(queries[c].astype(np.float64) - pool[j])) for j in cand}
        expect = sorted(cand, key=dist.get)[:n]
        assert out[c].tolist() == expect, c                  # nearest first


def test_knn_hand_made_line():
    # prompts on a line at 0, 1, 3, 6, 10 (clients 0..4); client 5 never uploaded
    pos = np.array([0, 1, 3, 6, 10, 99], np.float32)
    pool = np.stack([pos, np.zeros(6, np.float32)], 1)
    in_pool = np.array([True] * 5 + [False])
    queries = np.array([[0, 0], [6, 0], [10, 0], [2.1, 0]], np.float32)
    out = router.route("knn", pool, in_pool, queries, np.array([0, 3, 4, 5]), 3, 0, 0)
    assert out[0].tolist() == [1, 2, 3]
    assert out[1].tolist() == [2, 4, 1]       # |6-3| = 3 < |6-10| = 4
    assert out[2].tolist() == [3, 2, 1]
    assert out[3].tolist() == [2, 1, 0]      # not itself excluded: it is not in the pool; 99 never chosen


def test_random_deterministic_per_seed_and_round_and_redrawn_across_rounds():
    pool, in_pool = _pool(N=30, trained=range(30))
    clients = np.arange(30)
    a = _route("random", pool, in_pool, clients, 5, seed=1, round_=2)
    b = _route("random", pool, in_pool, clients, 5, seed=1, round_=2)
    c = _route("random", pool, in_pool, clients, 5, seed=1, round_=3)
    d = _route("random", pool, in_pool, clients, 5, seed=2, round_=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)
    # a client's draw does not depend on which other clients are routed with it
    sub = _route("random", pool, in_pool, np.array([7, 21]), 5, seed=1, round_=2)
    assert np.array_equal(sub, a[[7, 21]])


def test_fixed_same_across_rounds_and_one_permutation_for_all():
    pool, in_pool = _pool(N=30, trained=range(0, 30, 2))
    clients = np.arange(30)
    a = _route("fixed", pool, in_pool, clients, 4, seed=1, round_=0)
    b = _route("fixed", pool, in_pool, clients, 4, seed=1, round_=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _route("fixed", pool, in_pool, clients, 4, seed=5, round_=0))
    # untrained clients (odd ids) are not excluded from anything: they all get the same list,
    # the first 4 trained clients of the one permutation
    odd = a[1::2]
    assert (odd == odd[0]).all()
    # a trained client gets that list with itself removed (and the next one appended)
    for c in range(0, 30, 2):
        if c in odd[0]:
            assert c not in a[c]
            assert [x for x in odd[0] if x != c] == a[c].tolist()[:3]
        else:
            assert a[c].tolist() == odd[0].tolist()


def test_unknown_method_raises():
    pool, in_pool = _pool()
    with pytest.raises(ValueError):
        _route("nearest", pool, in_pool, np.arange(3), 2)


# ------------------------------------------------------------------ participants

@pytest.mark.parametrize("n_clients, frac, m", [(10, 0.3, 3), (20, 0.5, 10), (7, 0.01, 1), (100, 0.25, 25)])
def test_sample_participants_count_sorted_unique(n_clients, frac, m):
    p = sample_participants(1, 0, n_clients, frac)
    assert len(p) == m
    assert np.array_equal(p, np.sort(p)) and len(np.unique(p)) == m
    assert p.min() >= 0 and p.max() < n_clients


@pytest.mark.parametrize("n_clients, frac, floor, nearest", [(10, 0.35, 3, 4), (7, 0.5, 3, 4), (30, 0.25, 7, 8),
                                                             (3, 0.1, 1, 1)])
def test_participant_count_truncates_as_the_reference_unless_asked(n_clients, frac, floor, nearest):
    # the reference: m = max(int(frac * num_users), 1)
    assert len(sample_participants(1, 0, n_clients, frac)) == floor
    assert len(sample_participants(1, 0, n_clients, frac, "round")) == nearest


def test_sample_participants_deterministic_and_varies():
    a = sample_participants(3, 4, 50, 0.2)
    assert np.array_equal(a, sample_participants(3, 4, 50, 0.2))
    assert not np.array_equal(a, sample_participants(3, 5, 50, 0.2))
    assert not np.array_equal(a, sample_participants(4, 4, 50, 0.2))


@pytest.mark.parametrize("n_clients", [1, 5, 10])
def test_sample_participants_all(n_clients):
    for r in range(3):
        assert sample_participants(0, r, n_clients, 1.0).tolist() == list(range(n_clients))
