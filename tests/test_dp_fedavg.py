"""Server-side FedAvg (fedavg) and the DP clipping and noise of uploads (dp.privatize)."""
from __future__ import annotations

import numpy as np
import pytest

from pfedmoap.algorithms.base import fedavg
from pfedmoap.dp import privatize


def _prompts(n, P=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, P)).astype(np.float32)


def test_fedavg_is_the_sample_weighted_mean():
    prompts = _prompts(3)
    n = np.array([10, 30, 60])
    out = fedavg(prompts, n)
    expect = (10 * prompts[0].astype(np.float64) + 30 * prompts[1] + 60 * prompts[2]) / 100
    assert out.shape == (12,) and out.dtype == np.float32
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-7)
    # not the unweighted mean
    assert np.abs(out - prompts.mean(0)).max() > 1e-3


def test_fedavg_hand_computed():
    prompts = np.array([[1.0, 0.0, 2.0], [3.0, 4.0, -2.0]], np.float32)
    out = fedavg(prompts, np.array([1, 3]))
    np.testing.assert_allclose(out, [2.5, 3.0, -1.0], rtol=0, atol=1e-7)


def test_fedavg_weights_sum_to_one():
    prompts = _prompts(4, seed=1)
    n = np.array([5, 1, 7, 2])
    out = fedavg(prompts, n)
    for k in (3, 1000):
        np.testing.assert_allclose(fedavg(prompts, n * k), out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fedavg(prompts, n.astype(np.float32) / 13), out, rtol=1e-6, atol=1e-7)
    # identical uploads average to themselves, whatever the counts
    same = np.repeat(prompts[:1], 4, axis=0)
    np.testing.assert_allclose(fedavg(same, n), prompts[0], rtol=1e-6, atol=1e-7)
    # affine: adding a constant to every upload adds it to the average
    np.testing.assert_allclose(fedavg(prompts + 2.0, n), out + 2.0, rtol=1e-6, atol=1e-6)


def test_fedavg_single_client_returns_its_prompt():
    p = _prompts(1, seed=2)
    np.testing.assert_allclose(fedavg(p, np.array([17])), p[0], rtol=1e-7, atol=0)


def test_fedavg_zero_count_client_has_no_weight():
    prompts = _prompts(3, seed=3)
    out = fedavg(prompts, np.array([4, 0, 4]))
    np.testing.assert_allclose(out, (prompts[0] + prompts[2]) / 2, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ DP

@pytest.mark.parametrize("clip", [0.5, 1.0, 3.0])
def test_clipping_bounds_the_norm(clip):
    v = _prompts(1, P=64, seed=4)[0] * 10          # norm ~ 80, far above every clip
    out = privatize(v, clip, 0.0, np.random.default_rng(0))
    assert np.linalg.norm(out) <= clip * (1 + 1e-5)
    np.testing.assert_allclose(np.linalg.norm(out), clip, rtol=1e-5)
    # the direction is kept
    cos = float(out @ v / (np.linalg.norm(out) * np.linalg.norm(v)))
    assert cos > 1 - 1e-6


def test_short_vectors_unchanged_without_noise():
    v = _prompts(1, P=64, seed=5)[0]
    v = v / np.linalg.norm(v) * 0.7
    out = privatize(v, 1.0, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(out, v, rtol=1e-6, atol=0)
    z = np.zeros(10, np.float32)
    np.testing.assert_array_equal(privatize(z, 1.0, 0.0, np.random.default_rng(0)), z)


def test_clip_zero_is_off():
    v = _prompts(1, P=64, seed=6)[0] * 10
    out = privatize(v, 0.0, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, v)


@pytest.mark.parametrize("clip, mult", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.3)])
def test_noise_std_is_multiplier_times_clip(clip, mult):
    v = np.random.default_rng(7).normal(size=200_000).astype(np.float32)   # norm ~ 450 > clip
    clipped = v * (clip / np.linalg.norm(v))
    out = privatize(v, clip, mult, np.random.default_rng(1))
    noise = out.astype(np.float64) - clipped
    assert abs(noise.std() / (mult * clip) - 1) < 0.05
    assert abs(noise.mean()) < 0.05 * mult * clip
    assert out.shape == v.shape and out.dtype == np.float32


def test_noise_deterministic_for_a_generator():
    v = _prompts(1, P=256, seed=8)[0]
    a = privatize(v, 1.0, 1.0, np.random.default_rng(42))
    b = privatize(v, 1.0, 1.0, np.random.default_rng(42))
    c = privatize(v, 1.0, 1.0, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # the caller's prompt is not modified in place
    np.testing.assert_array_equal(v, _prompts(1, P=256, seed=8)[0])
