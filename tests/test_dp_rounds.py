"""Issue 21: ε is accounted at what each round actually ran (participants / N), recomputed here with
an independent formula; the results record the accountant, its orders and version, the mechanism
and the neighbouring relation."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

from pfedmoap import cli, dp, store  # noqa: E402

INTEGER_ORDERS = list(range(2, 257))

# FedOTP trains every client in round 0 and round(0.3 * 10) = 3 of 10 in the others.
FEDOTP = ["algorithm=fedotp", "model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic",
          "data.n_clients=10", "data.n_train=200", "data.n_test=50", "data.min_size=5", "data.cache_dir=",
          "data.augment=none", "data.augment_views=0", "prompt.n_ctx=4", "rounds=3", "train.local_epochs=1",
          "train.frac=0.3", "run.threads=1", "dp.clip=1", "dp.noise_multiplier=1", "seed=1"]


def rdp_sampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP of order alpha (an integer >= 2) of the Poisson-subsampled Gaussian with rate q and noise
    multiplier sigma: Mironov, Talwar, Zhang 2019 ("Rényi DP of the Sampled Gaussian Mechanism"),
    Sec. 3.3, A_alpha = sum_k binom(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)),
    RDP = log(A_alpha) / (alpha - 1); summed in log space."""
    if q == 0:
        return 0.0
    if q == 1:
        return alpha / (2 * sigma ** 2)
    logs = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
            + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2)
            for k in range(alpha + 1)]
    top = max(logs)
    return (top + math.log(sum(math.exp(x - top) for x in logs))) / (alpha - 1)


def epsilon_from_rdp(rdp: dict[int, float], delta: float) -> float:
    """(ε, δ) from RDP curves by the conversion of Canonne, Kamath, Steinke 2020 (Prop. 12 of
    Balle et al. 2020): ε = min_α rdp(α) + log((α-1)/α) - (log δ + log α) / (α - 1)."""
    return max(0.0, min(r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                        for a, r in rdp.items()))


def independent_epsilons(rates, sigma: float, delta: float, orders) -> list[float]:
    total = dict.fromkeys(orders, 0.0)
    out = []
    for q in rates:
        for a in orders:
            total[a] += rdp_sampled_gaussian(q, sigma, a)
        out.append(epsilon_from_rdp(total, delta))
    return out


@pytest.fixture
def keep_signals():
    """cli.main installs SIGTERM/SIGUSR1 handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _run(tmp_path, sets) -> dict:
    args = ["run", "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 0
    return store.read_results(tmp_path / "run")


def test_the_issues_figures():
    # sigma 1, delta 1e-5: every client in round 0, then 0.3 of them (what FedOTP does at frac 0.3).
    # Before the fix, the rate of round 0 was taken as 0.3 too: 3.29 / 4.24 / 4.91.
    got = dp.Accountant(1.0, 1e-5).curve([1.0, 0.3, 0.3])
    assert np.round(got, 2).tolist() == [4.73, 5.66, 6.29]
    assert np.round(dp.epsilon_per_round(1.0, 0.3, 3, 1e-5), 2).tolist() == [3.29, 4.24, 4.91]


def test_independent_formula_agrees_with_the_library_at_integer_orders():
    for rates, sigma in (([1.0, 0.3, 0.3], 1.0), ([0.1] * 20, 0.8), ([0.5, 1.0, 0.25], 2.0)):
        want = independent_epsilons(rates, sigma, 1e-5, INTEGER_ORDERS)
        got = dp.Accountant(sigma, 1e-5, INTEGER_ORDERS).curve(rates)
        assert np.allclose(got, want, rtol=1e-9, atol=0), (got, want)


def test_fedotp_round_zero_is_accounted_at_rate_one(tmp_path, keep_signals, monkeypatch):
    monkeypatch.setattr(dp, "ORDERS", INTEGER_ORDERS)       # the independent formula is for integer orders
    res = _run(tmp_path, FEDOTP)
    part = res["rounds"]["participated"].astype(bool)
    n = part.sum(1)
    assert n.tolist() == [10, 3, 3]                        # participation varies by round
    rates = (n / part.shape[1]).tolist()
    want = independent_epsilons(rates, 1.0, 1e-5, INTEGER_ORDERS)
    eps = res["rounds"]["dp_epsilon"]
    # the same RDP terms and conversion, computed apart: agreement to float rounding (rtol 1e-9)
    assert np.allclose(eps, want, rtol=1e-9, atol=0), (eps, want)
    # with rate 0.3 in round 0 (the old accounting) round 1 would have cost less than a third of this
    assert independent_epsilons([0.3], 1.0, 1e-5, INTEGER_ORDERS)[0] < eps[0] - 1.0
    a = res["attrs"]
    assert a["dp_epsilon"] == pytest.approx(want[-1], rel=1e-9)        # the planned total, the same here
    assert a["dp_noise_multiplier"] == 1.0 and a["dp_delta"] == 1e-5
    assert a["dp_mechanism"] == "gradient" and a["dp_clip"] == 1.0 and a["dp_sensitivity"] > 0
    assert a["dp_neighbours"] == dp.NEIGHBOURS and "add/remove" in a["dp_neighbours"]
    assert "RdpAccountant" in a["dp_accountant"] and "upper bound" in a["dp_accountant"]
    assert a["dp_accounting_version"] == version("dp-accounting")
    assert np.array_equal(a["dp_orders"], np.array(INTEGER_ORDERS, np.float64))
    from pfedmoap.analysis import report_main
    text = report_main([str(tmp_path / "run")], "table")
    assert "DP ε: neighbours add/remove one client (client-level); an upper bound" in text


def test_budget_is_calibrated_on_the_per_round_rates(tmp_path, keep_signals):
    sets = [s for s in FEDOTP if not s.startswith("dp.noise_multiplier")] + ["dp.epsilon=8", "dp.delta=0.05"]
    res = _run(tmp_path, sets)
    sigma = res["attrs"]["dp_noise_multiplier"]
    assert sigma == pytest.approx(dp.noise_for(8, 0.05, [1.0, 0.3, 0.3]))
    assert sigma > dp.noise_for(8, 0.05, 0.3, 3) * 1.05      # round 0 at rate 1 needs more noise
    eps = res["rounds"]["dp_epsilon"]
    assert eps[-1] <= 8 and eps[-1] == pytest.approx(8, rel=0.01)
    assert np.array_equal(res["attrs"]["dp_orders"], np.array(dp.orders()))


def test_dp_off_records_no_dp_attributes(tmp_path, keep_signals):
    sets = [s for s in FEDOTP if not s.startswith("dp.")] + ["rounds=1"]
    res = _run(tmp_path, sets)
    assert np.isnan(res["rounds"]["dp_epsilon"]).all()
    assert not any(k.startswith("dp_") and k not in ("dp_noise_multiplier", "dp_delta", "dp_epsilon")
                   for k in res["attrs"])


MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_a_dp_run_is_identical_at_1_and_3_ranks(tmp_path):
    """The gradient mechanism (per-step clip, noise keyed by (seed, round, client), one sensitivity for
    the run) and the per-round accounting give the same run at any rank count."""
    sets = ["algorithm=pfedmoap", "model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic",
            "data.n_clients=5", "data.n_train=200", "data.n_test=50", "data.min_size=5", "data.cache_dir=",
            "rounds=3", "train.local_epochs=1", "train.frac=0.6", "moe.n_experts=3", "run.threads=1",
            "prompt.n_ctx=4", "dp.clip=0.5", "dp.epsilon=20", "dp.delta=0.05"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    got = {}
    for ranks in (0, 3):
        args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(tmp_path / f"r{ranks}")]
        for s in sets:
            args += ["--set", s]
        p = subprocess.run(([MPIEXEC, "-n", "3"] if ranks else []) + args, capture_output=True, text=True,
                           timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        got[ranks] = store.read_results(tmp_path / f"r{ranks}")
    for key in ("accuracy", "loss", "experts", "participated", "bytes_up", "bytes_down", "dp_epsilon"):
        np.testing.assert_array_equal(got[3]["rounds"][key], got[0]["rounds"][key], err_msg=key)
    for key in ("dp_noise_multiplier", "dp_sensitivity", "dp_epsilon"):
        assert got[3]["attrs"][key] == got[0]["attrs"][key], key
