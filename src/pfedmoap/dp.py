"""Differential privacy of what leaves the clients (docs/privacy.md): the mechanisms, their
sensitivity, and the accounting of the client-level privacy they spend.

Two mechanisms (`dp.mechanism`), both applied on the client to the copy it uploads; the client keeps
its own un-noised prompt:

* "gradient" (the paper's): every local step clips the gradient of the uploaded rows to L2 norm
  `dp.clip`; the upload gets Gaussian noise of std sigma * S, S = `gradient_sensitivity` (the most
  the clipped steps can move the upload away from the data-independent trajectory).
* "upload": the upload itself is clipped to L2 norm `dp.clip` (S = clip) and gets noise sigma * clip.

`Accountant`, `epsilon`, `epsilon_per_round` and `noise_for` account the client-level privacy this
spends (see ACCOUNTING_ASSUMPTIONS).
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

MECHANISMS = ("gradient", "upload")
# The neighbouring relation every epsilon here assumes (recorded in results.h5, printed by reports).
NEIGHBOURS = "add/remove one client (client-level)"
ACCOUNTANT = ("dp_accounting.rdp.RdpAccountant: a Poisson-subsampled Gaussian per round at participants / N, "
              "RDP converted to (epsilon, delta); epsilon is an upper bound")
# The RDP orders runs account at; None: the library's DEFAULT_RDP_ORDERS (tests may narrow them).
ORDERS: Optional[Sequence[float]] = None


def privatize(prompt: np.ndarray, clip: float, noise_multiplier: float, gen: np.random.Generator) -> np.ndarray:
    """dp.mechanism = "upload": clip the upload to L2 norm `clip`, add N(0, (noise_multiplier * clip)^2)."""
    if clip <= 0:
        return prompt
    norm = float(np.linalg.norm(prompt))
    out = prompt * min(1.0, clip / norm) if norm > 0 else prompt.copy()
    if noise_multiplier > 0:
        out = out + gen.normal(0.0, noise_multiplier * clip, size=prompt.shape)
    return out.astype(np.float32)


def add_noise(upload: np.ndarray, std: float, gen: np.random.Generator) -> np.ndarray:
    """dp.mechanism = "gradient": the trained upload plus N(0, std^2) per value (std = sigma * S)."""
    out = upload + gen.normal(0.0, std, size=upload.shape) if std > 0 else upload
    return np.asarray(out, np.float32)


def clip_gradient_(grad, clip: float) -> None:
    """Scale a torch gradient in place to L2 norm <= clip (one local step of the "gradient" mechanism)."""
    norm = float(grad.norm())
    if norm > clip:
        grad.mul_(clip / norm)


def gradient_sensitivity(lrs: Sequence[float], momentum: float, weight_decay: float) -> float:
    """S / C: the largest L2 distance, per unit of gradient clip C, between the upload after the
    local steps with learning rates `lrs` (torch SGD: momentum, dampening 0, L2 weight decay added
    after clipping, fresh momentum buffer) and the upload the same steps give with zero loss
    gradients, from the same start. Exact worst case (docs/privacy.md): the two trajectories differ
    by e_T = sum_t c_t g_t with scalar c_t, so max ||e_T|| over ||g_t|| <= C is C * sum_t |c_t|.

    With x_t = (e_t, the momentum buffers' difference before step t):
        e_{t+1} = (1 - lr_t wd) e_t - lr_t mu b_{t-1} - lr_t g_t,   b_t = wd e_t + mu b_{t-1} + g_t;
    c_t is read off backwards (the adjoint of that linear recursion)."""
    mu, wd = float(momentum), float(weight_decay)
    v_e, v_b = 1.0, 0.0         # d e_T / d (e_t, b_{t-1}), from t = T down
    total = 0.0
    for lr in reversed([float(x) for x in lrs]):
        total += abs(v_e * -lr + v_b * 1.0)                 # c_t = v . B_t, B_t = (-lr, 1)
        v_e, v_b = v_e * (1 - lr * wd) + v_b * wd, v_e * (-lr * mu) + v_b * mu    # v <- v . A_t
    return total


# ---------------------------------------------------------------------------------------------
# Privacy accounting.
#
# Library: Google's `dp-accounting` (requirement `dp-accounting>=0.6.0,<0.7`), RDP accountant.
# Why this one: it is maintained (google/differential-privacy), pure Python on numpy/scipy/mpmath
# and installs without touching the pinned torch; Opacus' accountant would pull opacus (a torch
# training library) just for a few functions. Why RDP rather than the library's PLD accountant:
# RDP composes additively (a run's RDP is the sum of its rounds' RDP, each round a Poisson-
# subsampled Gaussian at that round's own sampling rate), so a run whose participation varies by
# round (FedOTP's round 0) costs one RDP evaluation per distinct rate; it is deterministic and is
# the accountant of Opacus / TF Privacy, so numbers compare with the literature. PLD is tighter
# (e.g. sigma=1, q=0.1, 500 rounds, delta=1e-5: PLD 16.6 vs RDP 18.2). Both are upper bounds on
# epsilon; the library drops fractional orders (e.g. 1.1-1.3) whose series do not converge, which
# only loosens the bound.
# ---------------------------------------------------------------------------------------------

ACCOUNTING_ASSUMPTIONS = """\
Accounting assumptions (client-level DP of what leaves the clients):
* Unit of privacy: one client's whole local dataset; neighbours differ by adding or removing one
  client (add/remove). The neighbour of a participating client uploads the data-independent
  point (the zero vector for dp.mechanism = "upload"; the same local steps with zero loss
  gradients for "gradient"). For replace-one neighbours (a client's data swapped for any other)
  the sensitivity doubles: the same epsilon holds for sigma / 2.
* One federated round = one step of a subsampled Gaussian mechanism: each upload has L2
  sensitivity S (dp.clip for "upload", dp.clip * gradient_sensitivity(...) for "gradient") and
  gets Gaussian noise of std noise_multiplier * S. The sample count never travels under DP.
* Participants: the server picks round r's participants as a pure function of the seed and r;
  round r is accounted at its own rate q_r = participants(r) / N (1 where every client trains,
  e.g. FedOTP's round 0). Fixed-size sampling is treated as Poisson sampling at rate q_r (the
  standard approximation of DP-FedAvg; not an exact bound for fixed-size sampling).
  Amplification by sampling assumes the observer does not know who was sampled; against the
  server, which picks the participants, use sample_rate = 1 (no amplification).
* The prompt each client keeps locally is never released and is not accounted.
* pFedMoAP's pool re-sends the noised uploads to other clients as experts (without saying whose):
  post-processing of already-privatized releases, no extra privacy cost. Likewise the server's
  average and everything routed from the pool.
* RDP accountant of dp-accounting (orders DEFAULT_RDP_ORDERS unless given), conversion to
  (epsilon, delta) by the library's improved bound (Canonne-Kamath-Steinke 2020): an upper bound.
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

    noise_multiplier: sigma = noise std / the upload's sensitivity (dp.noise_multiplier); 0 gives inf.
    sample_rate: q, the per-round participation rate (participants / N).
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


class Accountant:
    """Client-level epsilon of a run whose round r is a Poisson-subsampled Gaussian at its own
    sampling rate q_r (RDP accountant of dp-accounting): RDP adds over the rounds, one RDP
    evaluation per distinct rate. `epsilon(rates)` after the rounds `rates` describe; with one
    rate for every round it equals `epsilon(sigma, q, len(rates), delta)` exactly."""

    def __init__(self, noise_multiplier: float, delta: float, orders: Optional[Sequence[float]] = None):
        _require_library()
        _check(noise_multiplier, 0.0, 0, delta)
        self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
        self.orders = np.array(_rdp.DEFAULT_RDP_ORDERS if orders is None else orders, np.float64)
        self._rdp: dict[float, np.ndarray] = {}

    def round_rdp(self, sample_rate: float) -> np.ndarray:
        """The RDP of one round at rate q, at `self.orders`."""
        q = float(sample_rate)
        if q not in self._rdp:
            with _quiet_absl():
                self._rdp[q] = _one_round_rdp(self.noise_multiplier, q, list(self.orders))[1]
        return self._rdp[q]

    def epsilon(self, rates: Sequence[float]) -> float:
        total, groups = np.zeros(len(self.orders)), {}
        for q in rates:
            _check(self.noise_multiplier, float(q), 0, self.delta)
            if q > 0:
                groups[float(q)] = groups.get(float(q), 0) + 1
        if not groups:
            return 0.0                      # nothing released yet
        for q, count in groups.items():     # in order of first use, as the library's compose adds
            total = total + count * self.round_rdp(q)
        with _quiet_absl():
            return float(_rdp.compute_epsilon(self.orders, total, self.delta)[0])

    def curve(self, rates: Sequence[float]) -> np.ndarray:
        """eps[t] = epsilon(rates[:t + 1]) (float64)."""
        return np.array([self.epsilon(rates[:t + 1]) for t in range(len(rates))], np.float64)


def noise_for(epsilon: float, delta: float, sample_rate, rounds: Optional[int] = None,
              orders: Optional[Sequence[float]] = None, tol: float = 1e-6) -> float:
    """Smallest noise multiplier sigma (within `tol`) whose epsilon after the run is <= `epsilon`.

    sample_rate: q for every one of `rounds` rounds, or a sequence of per-round rates q_r (then
    `rounds` is its length; e.g. 1 for FedOTP's round 0, frac afterwards).
    Uses the library's own calibration (`dp_accounting.mechanism_calibration.calibrate_dp_mechanism`,
    Brent's method, result guaranteed on the private side) over the same events and accountant
    as `Accountant`, so `Accountant(noise_for(e, ...), ...).epsilon(rates) <= e`. Use it to run from
    a privacy budget (dp.epsilon, dp.delta) instead of a given dp.noise_multiplier.
    """
    _require_library()
    target = epsilon
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target}")
    if np.ndim(sample_rate) == 0:
        _check(0.0, sample_rate, rounds, delta)
        rates = [float(sample_rate)] * int(rounds)
    else:
        rates = [float(q) for q in sample_rate]
        if rounds is not None and rounds != len(rates):
            raise ValueError(f"rounds = {rounds} but {len(rates)} per-round rates")
        for q in rates:
            _check(0.0, q, 0, delta)
    groups: dict[float, int] = {}
    for q in rates:
        if q > 0:
            groups[q] = groups.get(q, 0) + 1
    if not groups:
        return 0.0

    def eps_at(sigma: float) -> float:
        return Accountant(sigma, delta, orders).epsilon(rates)

    def event(sigma: float):
        return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(_round_event(sigma, q), n)
                                              for q, n in groups.items()])

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
            lambda: _rdp.RdpAccountant(orders), event, target, delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
            tol=tol))


def orders() -> np.ndarray:
    """The RDP orders runs account at (ORDERS, or the library's defaults)."""
    _require_library()
    return np.array(_rdp.DEFAULT_RDP_ORDERS if ORDERS is None else ORDERS, np.float64)


def library_version() -> str:
    """dp-accounting's installed version (recorded in results.h5)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dp-accounting")
    except PackageNotFoundError:     # pragma: no cover
        return "unknown"


for _f in (epsilon, epsilon_per_round, noise_for, Accountant):
    _f.__doc__ += "\n" + ACCOUNTING_ASSUMPTIONS
del _f
