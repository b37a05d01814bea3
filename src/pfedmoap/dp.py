"""Differential privacy on what other clients see: clip the uploaded prompt's L2 norm, add noise.

Applied on the client to the copy it uploads, before the prompt enters the pool or the average;
the client keeps its own un-noised prompt.

`epsilon`, `epsilon_per_round` and `noise_for` account the client-level privacy this spends
(see ACCOUNTING_ASSUMPTIONS).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional, Sequence

import numpy as np

try:  # only the accounting functions below need it
    import dp_accounting
    from dp_accounting import mechanism_calibration
    from dp_accounting.rdp import rdp_privacy_accountant as _rdp
except ImportError:  # pragma: no cover - exercised only without the package
    dp_accounting = None


def privatize(prompt: np.ndarray, clip: float, noise_multiplier: float, gen: np.random.Generator) -> np.ndarray:
    if clip <= 0:
        return prompt
    norm = float(np.linalg.norm(prompt))
    out = prompt * min(1.0, clip / norm) if norm > 0 else prompt.copy()
    if noise_multiplier > 0:
        out = out + gen.normal(0.0, noise_multiplier * clip, size=prompt.shape)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Privacy accounting.
#
# Library: Google's `dp-accounting` (requirement `dp-accounting>=0.6.0,<0.7`), RDP accountant.
# Why this one: it is maintained (google/differential-privacy), pure Python on numpy/scipy/mpmath
# and installs without touching the pinned torch; Opacus' accountant would pull opacus (a torch
# training library) just for a few functions. Why RDP rather than the library's PLD accountant:
# RDP composes linearly (rdp after t rounds = t * rdp of one round, exactly what the library's
# own SelfComposedDpEvent does), so the per-round curve costs one RDP evaluation, is deterministic
# and is the accountant used by Opacus / TF Privacy, so numbers compare with the literature.
# PLD is tighter (e.g. sigma=1, q=0.1, 500 rounds, delta=1e-5: PLD 16.6 vs RDP 18.2) but costs
# a fresh composition per round. Both are valid upper bounds on epsilon.
# ---------------------------------------------------------------------------------------------

ACCOUNTING_ASSUMPTIONS = """\
Accounting assumptions (client-level DP of what leaves the clients):
* Unit of privacy: one client's whole local dataset (client-level add/remove neighbours).
* One federated round = one step of a subsampled Gaussian mechanism: the client's uploaded
  prompt is clipped to L2 norm `clip` (sensitivity `clip`) and gets Gaussian noise of std
  `noise_multiplier * clip`, i.e. noise multiplier sigma in units of the sensitivity. The
  neighbour of a participating client is the null upload (no contribution), as in DP-FedAvg.
  (Each upload carries its own noise and is seen on its own; for replace-one neighbours, any
  dataset swapped for any other, the sensitivity would be 2 * clip: account sigma / 2.)
* Participants: each round the server draws round(frac * N) clients without replacement; the
  accountant treats this as Poisson sampling with rate q = frac (the standard approximation
  used by DP-FedAvg; it is not an exact bound for fixed-size sampling). Amplification by
  sampling assumes the observer does not know who was sampled; against the server, which
  picks the participants, use sample_rate = 1 (no amplification).
* The prompt each client keeps locally is never released and is not accounted.
* pFedMoAP's pool re-sends the noised uploads to other clients as experts: post-processing of
  already-privatized releases, no extra privacy cost. Likewise the server's average.
* RDP accountant of dp-accounting (orders DEFAULT_RDP_ORDERS unless given), conversion to
  (epsilon, delta) by the library's improved bound (Canonne-Kamath-Steinke 2020).
"""


def _require_library() -> None:
    if dp_accounting is None:
        raise ImportError("privacy accounting needs the 'dp-accounting' package: pip install 'dp-accounting>=0.6.0,<0.7'")


@contextlib.contextmanager
def _quiet_absl():
    # The library logs a warning for each fractional RDP order whose series does not converge
    # (tiny sigma); it then drops that order, which only makes the bound more conservative.
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps/rounds must be a non-negative integer, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _round_event(noise_multiplier: float, sample_rate: float):
    return dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


def _one_round_rdp(noise_multiplier: float, sample_rate: float, orders: Optional[Sequence[float]]):
    acc = _rdp.RdpAccountant(orders)
    acc.compose(_round_event(noise_multiplier, sample_rate))
    return acc.orders, acc.rdp


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            orders: Optional[Sequence[float]] = None) -> float:
    """Client-level epsilon spent after `steps` rounds at `delta` (RDP accountant of dp-accounting).

    noise_multiplier: sigma = noise std / clip (dp.noise_multiplier); 0 gives inf.
    sample_rate: q, the per-round participation rate (train.frac).
    steps: number of rounds run so far; 0 gives 0.
    orders: RDP orders (default: the library's DEFAULT_RDP_ORDERS).
    """
    _require_library()
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0 or sample_rate == 0:
        return 0.0
    with _quiet_absl():
        acc = _rdp.RdpAccountant(orders)
        acc.compose(_round_event(noise_multiplier, sample_rate), int(steps))
        return float(acc.get_epsilon(delta))


def epsilon_per_round(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                      orders: Optional[Sequence[float]] = None) -> np.ndarray:
    """eps[t-1] = epsilon(noise_multiplier, sample_rate, t, delta) for t = 1..rounds (float64).

    The RDP of t rounds is t times the RDP of one round, so this costs one RDP evaluation;
    every entry equals `epsilon(..., steps=t, ...)` exactly.
    """
    _require_library()
    _check(noise_multiplier, sample_rate, rounds, delta)
    out = np.zeros(int(rounds), dtype=np.float64)
    if rounds == 0 or sample_rate == 0:
        return out
    with _quiet_absl():
        ords, rdp1 = _one_round_rdp(noise_multiplier, sample_rate, orders)
        for t in range(1, int(rounds) + 1):
            # the library's SelfComposedDpEvent(count=t) on a fresh accountant computes 0 + t * rdp1
            out[t - 1] = _rdp.compute_epsilon(ords, 0 + t * rdp1, delta)[0]
    return out


def noise_for(epsilon: float, delta: float, sample_rate: float, rounds: int,
              orders: Optional[Sequence[float]] = None, tol: float = 1e-6) -> float:
    """Smallest noise multiplier sigma (within `tol`) whose epsilon after `rounds` rounds is <= `epsilon`.

    Uses the library's own calibration (`dp_accounting.mechanism_calibration.calibrate_dp_mechanism`,
    Brent's method, result guaranteed on the private side) over the same event and accountant
    as `epsilon`, so `epsilon(noise_for(e, ...), ...) <= e`. Use it to run from a privacy budget
    (dp.epsilon, dp.delta) instead of a given dp.noise_multiplier.
    """
    _require_library()
    target = epsilon
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target}")
    _check(0.0, sample_rate, rounds, delta)
    if rounds == 0 or sample_rate == 0:
        return 0.0

    def eps_at(sigma: float) -> float:
        acc = _rdp.RdpAccountant(orders)
        acc.compose(_round_event(sigma, sample_rate), int(rounds))
        return acc.get_epsilon(delta)

    with _quiet_absl():
        # Explicit bracket [lo, hi] with eps(lo) > target >= eps(hi): the library's own bracket
        # search would start at sigma = 0, where epsilon is inf and Brent's method cannot start.
        hi = 1.0
        while eps_at(hi) > target:
            hi *= 2.0
            if hi > 1e6:
                raise ValueError(f"no noise multiplier <= 1e6 reaches epsilon={target} at delta={delta}")
        lo = hi / 2.0
        while eps_at(lo) <= target:
            lo /= 2.0
            if lo < 1e-6:  # any tiny noise meets this budget
                return lo
        return float(mechanism_calibration.calibrate_dp_mechanism(
            lambda: _rdp.RdpAccountant(orders),
            lambda sigma: dp_accounting.SelfComposedDpEvent(_round_event(sigma, sample_rate), int(rounds)),
            target, delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
            tol=tol))


for _f in (epsilon, epsilon_per_round, noise_for):
    _f.__doc__ += "\n" + ACCOUNTING_ASSUMPTIONS
del _f
