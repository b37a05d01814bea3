"""Entropic optimal transport between an image's patch features and its N prompts (FedOTP).

FedOTP (Li et al., CVPR 2024; reference code HongxiaLee/FedOTP, ``trainers/GLP_OT.py``) scores
class c of image b by transporting the image's M patch features onto the N text features of
class c (N = 2: the global and the local prompt). With sim[m, n] the cosine similarity of patch m
and prompt n, cost = 1 - sim, and T the entropic OT plan for that cost:

    logits[b, c] = logit_scale * sum_{m,n} T[m, n] * sim[m, n]

T is computed without gradient; sim stays in the autograd graph, so the prompts learn through
sim only. The pooled image feature does not enter the logits. Two plans:

* ``"cot"`` (the reference's default, ``entropic_COT_fast``): patch mass a = 1/M each,
  prompt mass b = top_percent/N each; the plan moves exactly top_percent of mass:
      min <cost, T> + eps * sum T (log T - 1)   s.t.  T 1 <= a,  T^T 1 = b.
  Iterated as the reference does, by dual coordinate ascent from v = 1:
      u = min(a / (K v), 1),  v = b / (K^T u),  K = exp(-cost/eps),  T = diag(u) K diag(v).
  This is the problem of POT's ``ot.partial.entropic_partial_wasserstein(a, b, cost, eps,
  m=top_percent)`` (rows <= a, columns <= b, total mass m = sum(b), so columns = b).
* ``"sinkhorn"`` (the reference's ``Sinkhorn``): balanced, rows = 1/M, columns = 1/N, iterated
  u = a / (K v), v = b / (K^T u) from u = v = 1 (``ot.sinkhorn``'s problem).

Stopping follows the reference's measure: the mean absolute change of the scaling vector it
watches (v for COT, u for Sinkhorn) between two iterations, compared with ``thresh``; at most
``max_iter`` iterations. Defaults: eps 0.1, thresh 1e-3, max_iter 100 (federated_main.py's
argparse defaults; eps 0.1 is also the CIFAR-100 script's, the few-shot RN50 script uses 0.01)
and top_percent 0.8 (both published scripts). The argparse default top_percent = 1 makes COT a
balanced problem whose potentials are free up to a shift that only the u <= 1 cap pins; the
iteration creeps towards it (median 200-400 iterations to reach 1e-3 at eps 0.1 on CLIP-like
costs, vs < 40 for 0.8), so it runs to max_iter (see ``tests/test_ot.py``).

Decisions and differences from the reference:

* Log domain, always. The reference exponentiates K = exp(-cost/eps) and divides by K v; with
  eps = 0.01 (its few-shot scripts) K underflows for cost > ~0.17 in fp16 and > ~0.87 in fp32,
  giving 0/0 = NaN plans (the reference then returns None for the batch). Here the potentials
  log u, log v are iterated with logsumexp, in float32 whatever the input dtype (float64 stays
  float64), and autocast is switched off inside, so fp16/bf16 inputs give finite plans. The
  iterates are those of the reference's scaling iteration, up to rounding.
* The stop measure is evaluated in the log domain too (the log of the mean absolute change,
  max-shifted), so it is the reference's number without the overflow of v ~ 1/K. It is an
  absolute measure: for eps = 0.01, v ~ exp(cost/eps) ~ 1e30, so the threshold is met only at
  an exact floating-point fixed point and many problems run to max_iter, as in the reference.
* ``stop = "per_problem"`` (default): each of the B*C problems stops when its own change falls
  below the threshold (it keeps the update that met it), so an image's logits do not depend on
  the rest of its batch. ``stop = "batch"`` is the reference's rule: all problems of the batch
  iterate until the mean change over the whole batch falls below the threshold.
* The reference computes ``top_percent = min(sum(a over the whole batch), top_percent)``, a
  no-op (the sum is B*C >= 1); here 0 < top_percent <= 1 is required. The reference's COT takes
  an unused ``reg = 0.01`` argument; eps is the only regulariser here.
* Features are L2-normalised here (the reference normalises both before the einsum), and sim is
  formed in float32 (autocast off), so the logits are float32 (float64 for float64 inputs).
* ``logit_scale`` is the multiplier itself (CLIP's ``logit_scale.exp()``), not its log.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["OTOptions", "ot_plan", "ot_logits"]

METHODS = ("cot", "sinkhorn")
STOPS = ("per_problem", "batch")


@dataclass(frozen=True)
class OTOptions:
    """How the plan is computed. Defaults: the reference's COT settings (see module docstring)."""
    method: str = "cot"            # "cot" (partial: rows <= 1/M, columns = top_percent/N) | "sinkhorn"
    eps: float = 0.1               # entropic regularisation
    top_percent: float = 0.8       # COT: mass moved (ignored by "sinkhorn")
    thresh: float = 1e-3           # stop when the mean |change| of the watched scaling vector < thresh
    max_iter: int = 100
    stop: str = "per_problem"      # "per_problem" | "batch" (the reference's rule)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"OT method {self.method!r}: expected one of {METHODS}")
        if self.stop not in STOPS:
            raise ValueError(f"OT stop {self.stop!r}: expected one of {STOPS}")
        if not self.eps > 0:
            raise ValueError(f"OT eps = {self.eps}: must be > 0")
        if not 0 < self.top_percent <= 1:
            raise ValueError(f"OT top_percent = {self.top_percent}: must lie in (0, 1]")
        if self.max_iter < 1:
            raise ValueError(f"OT max_iter = {self.max_iter}: must be >= 1")
        if not self.thresh >= 0:
            raise ValueError(f"OT thresh = {self.thresh}: must be >= 0")


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp along dim for finite x (cheaper than torch.logsumexp, which guards infinities)."""
    m = x.amax(dim, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def _log_mean_abs_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """log(mean_k |exp(new_k) - exp(old_k)|) per row, without forming exp(new), which overflows
    for small eps: |e^x - e^y| = e^max(x,y) (1 - e^-|x-y|). Rows with no change give -inf."""
    hi = torch.maximum(new, old)
    top = hi.amax(-1, keepdim=True)
    s = (torch.exp(hi - top) * (1.0 - torch.exp(-(new - old).abs()))).sum(-1)
    return top.squeeze(-1) + torch.log(s) - math.log(new.shape[-1])


def _step(lKt, lu, lv, log_a, log_b, cot):
    """One sweep of the reference's iteration in the log domain, lKt = log K as (P, N, M):
    log u = log a - log(K v) (COT: capped at 0, u <= 1), then log v = log b - log(K^T u)."""
    lu = log_a - _lse(lKt + lv.unsqueeze(-1), dim=-2)
    if cot:
        lu = lu.clamp(max=0.0)
    lv = log_b - _lse(lKt + lu.unsqueeze(-2), dim=-1)
    return lu, lv


@torch.no_grad()
def ot_plan(cost: torch.Tensor, options: OTOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT plans for a batch of problems.

    cost: (P, M, N), any float dtype; it is detached. Returns (T, n_iter): T (P, M, N) in float32
    (float64 for float64 input), n_iter (P,) int64, the iterations each problem ran.
    """
    o = options or OTOptions()
    if cost.dim() != 3:
        raise ValueError(f"cost must be (problems, M, N), got shape {tuple(cost.shape)}")
    P, M, N = cost.shape
    cot = o.method == "cot"
    dtype = _work_dtype(cost)
    with torch.autocast(cost.device.type, enabled=False):
        lKt = (cost.detach().to(dtype) / -o.eps).transpose(1, 2).contiguous()    # (P, N, M)
        log_a = -math.log(M)
        log_b = math.log((o.top_percent if cot else 1.0) / N)
        lu = lKt.new_zeros(P, M)                    # u = 1, v = 1: the reference's starting point
        lv = lKt.new_zeros(P, N)
        n_iter = torch.zeros(P, dtype=torch.int64, device=cost.device)
        log_thresh = math.log(o.thresh) if o.thresh > 0 else -math.inf
        if o.stop == "batch":
            for _ in range(o.max_iter):
                lu_new, lv_new = _step(lKt, lu, lv, log_a, log_b, cot)
                ch = _log_mean_abs_change(lv_new, lv) if cot else _log_mean_abs_change(lu_new, lu)
                lu, lv = lu_new, lv_new
                n_iter += 1
                # mean over all entries of the batch = mean of the per-problem means (equal sizes)
                if (torch.logsumexp(ch, 0) - math.log(P)).item() < log_thresh:
                    break
        else:
            # Per-problem: a working set of unfinished problems, compacted when half of it is done.
            idx = torch.arange(P, device=cost.device)
            wK, wu, wv = lKt, lu, lv
            live = torch.ones(P, dtype=torch.bool, device=cost.device)
            for _ in range(o.max_iter):
                nu, nv = _step(wK, wu, wv, log_a, log_b, cot)
                ch = _log_mean_abs_change(nv, wv) if cot else _log_mean_abs_change(nu, wu)
                wu = torch.where(live.unsqueeze(-1), nu, wu)
                wv = torch.where(live.unsqueeze(-1), nv, wv)
                n_iter.index_add_(0, idx, live.to(torch.int64))
                live = live & ~(ch < log_thresh)
                n_live = int(live.sum())
                if n_live == 0:
                    break
                if n_live <= live.numel() // 2:
                    lu[idx], lv[idx] = wu, wv
                    keep = live.nonzero().squeeze(-1)
                    idx, wK, wu, wv = idx[keep], wK[keep], wu[keep], wv[keep]
                    live = live[keep]
            lu[idx], lv[idx] = wu, wv
        T = torch.exp(lKt + lu.unsqueeze(-2) + lv.unsqueeze(-1)).transpose(1, 2).contiguous()
    return T, n_iter


def ot_logits(patch_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
              options: OTOptions | None = None, return_plan: bool = False):
    """FedOTP's class logits.

    patch_features: (B, M, D) dense image features (``pfedmoap.clip.dense``), text_features:
    (N, C, D) (prompt n of class c), logit_scale: the multiplier (float or scalar tensor).
    Returns logits (B, C) = logit_scale * sum_{m,n} T[b,c,m,n] * sim[b,c,m,n], differentiable
    through sim (both feature tensors) and logit_scale; with return_plan also T (B, C, M, N).
    """
    if patch_features.dim() != 3 or text_features.dim() != 3:
        raise ValueError(f"patch_features must be (B, M, D) and text_features (N, C, D); got "
                         f"{tuple(patch_features.shape)} and {tuple(text_features.shape)}")
    B, M, D = patch_features.shape
    N, C, Dt = text_features.shape
    if D != Dt:
        raise ValueError(f"feature widths differ: patches {D}, text {Dt}")
    dtype = _work_dtype(patch_features, text_features)
    with torch.autocast(patch_features.device.type, enabled=False):
        x = F.normalize(patch_features.to(dtype), dim=-1)
        t = F.normalize(text_features.to(dtype), dim=-1)
        sim = torch.einsum("bmd,ncd->bcmn", x, t)                       # (B, C, M, N)
        T, _ = ot_plan((1.0 - sim.detach()).reshape(B * C, M, N), options)
        T = T.view(B, C, M, N)
        logits = logit_scale * (T * sim).sum(dim=(-2, -1))
    return (logits, T) if return_plan else logits
