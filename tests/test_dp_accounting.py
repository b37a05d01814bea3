"""Privacy accounting (pfedmoap.dp.epsilon / epsilon_per_round / noise_for) on dp-accounting's RDP accountant."""
import math

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from pfedmoap import dp  # noqa: E402


def test_library_example_gaussian_one_step():
    # dp-accounting's rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian:
    # "noise multiplier is chosen to obtain exactly (1, 1e-6)-DP" with orders 1.000..99.999.
    orders = [0.001 * i for i in range(1000, 100000)]
    assert dp.epsilon(4.530877117, 1.0, 1, 1e-6, orders=orders) == pytest.approx(1.0, abs=1e-6)
    # the default orders are coarser: the bound can only get (slightly) worse
    e = dp.epsilon(4.530877117, 1.0, 1, 1e-6)
    assert 1.0 - 1e-9 <= e < 1.001


def test_library_example_poisson_subsampled_gaussian_rdp():
    # dp-accounting's rdp_privacy_accountant_test.test_compute_rdp_poisson_sampled_gaussian:
    # sigma 2.5, q 0.01, 50 steps -> RDP at orders [1.5, 2.5, 5, 50, 100, inf].
    orders = [1.5, 2.5, 5, 50, 100, np.inf]
    expected = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02, np.inf]
    ords, rdp1 = dp._one_round_rdp(2.5, 0.01, orders)
    assert np.allclose(50 * rdp1, expected)
    # and our epsilon is the library's RDP -> (eps, delta) conversion of exactly that curve
    from dp_accounting.rdp import rdp_privacy_accountant as r
    want = r.compute_epsilon(orders[:-1], expected[:-1], 1e-5)[0]  # order inf adds nothing
    assert dp.epsilon(2.5, 0.01, 50, 1e-5, orders=orders[:-1]) == pytest.approx(want, rel=1e-6)


def test_rdp_bounds_the_library_pld_example():
    # dp-accounting's pld_privacy_accountant_test.test_poisson_subsampled_gaussian: q 0.2,
    # sigma 0.5, 3 steps is (1, 0.15594)-DP by the (tighter) PLD accountant. RDP is an upper bound.
    e = dp.epsilon(0.5, 0.2, 3, 0.15594)
    assert 1.0 - 1e-3 <= e < 5.0


def test_more_noise_smaller_epsilon():
    sig = [0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 10.0]
    eps = [dp.epsilon(s, 0.1, 100, 1e-5) for s in sig]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert all(math.isfinite(e) and e > 0 for e in eps)


def test_more_rounds_larger_epsilon_and_per_round_matches():
    curve = dp.epsilon_per_round(1.0, 0.1, 50, 1e-5)
    assert curve.shape == (50,) and curve.dtype == np.float64
    assert np.all(np.diff(curve) > 0)
    for t in (1, 7, 50):
        assert curve[t - 1] == dp.epsilon(1.0, 0.1, t, 1e-5)  # exactly the same computation
    # higher sampling rate also costs more
    assert dp.epsilon(1.0, 0.2, 50, 1e-5) > curve[-1]
    # larger delta, smaller epsilon
    assert dp.epsilon(1.0, 0.1, 50, 0.05) < curve[-1]


@pytest.mark.parametrize("target,delta,q,rounds", [
    (25.0, 0.05, 0.1, 200),    # the paper's budget
    (1.0, 1e-5, 0.1, 500),
    (8.0, 1e-5, 1.0, 50),      # no amplification (all clients, or against the server)
    (3.0, 1e-5, 0.25, 30),
])
def test_noise_for_round_trips(target, delta, q, rounds):
    s = dp.noise_for(target, delta, q, rounds)
    assert s > 0
    e = dp.epsilon(s, q, rounds, delta)
    assert e <= target * (1 + 1e-9)          # calibrated on the private side
    assert e == pytest.approx(target, rel=0.01)
    assert dp.epsilon(0.97 * s, q, rounds, delta) > target  # a bit less noise overspends


def test_noise_for_needs_more_noise_for_tighter_budget():
    assert dp.noise_for(1.0, 1e-5, 0.1, 100) > dp.noise_for(10.0, 1e-5, 0.1, 100)
    assert dp.noise_for(4.0, 1e-5, 0.1, 400) > dp.noise_for(4.0, 1e-5, 0.1, 100)


def test_no_noise_is_infinite_epsilon():
    assert dp.epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert np.all(np.isinf(dp.epsilon_per_round(0.0, 1.0, 3, 1e-5)))


def test_nothing_released_costs_nothing():
    assert dp.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert dp.epsilon_per_round(1.0, 0.1, 0, 1e-5).shape == (0,)


@pytest.mark.parametrize("args", [
    (-1.0, 0.1, 10, 1e-5), (1.0, 1.5, 10, 1e-5), (1.0, 0.1, -1, 1e-5),
    (1.0, 0.1, 10, 0.0), (1.0, 0.1, 10, 1.0), (math.nan, 0.1, 10, 1e-5),
])
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        dp.epsilon(*args)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_noise_for_bad_budget_raises(target):
    with pytest.raises(ValueError):
        dp.noise_for(target, 1e-5, 0.1, 10)


def test_privatize_unchanged():
    # accounting is additive: privatize still clips then adds N(0, (sigma*clip)^2) from gen
    p = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = dp.privatize(p, 2.0, 0.7, np.random.default_rng(5))
    g = np.random.default_rng(5)
    want = (p * (2.0 / np.linalg.norm(p)) + g.normal(0.0, 1.4, size=p.shape)).astype(np.float32)
    assert np.array_equal(a, want)


def test_assumptions_documented():
    for f in (dp.epsilon, dp.epsilon_per_round, dp.noise_for):
        doc = f.__doc__
        assert "client-level" in doc and "Poisson" in doc and "post-processing" in doc
