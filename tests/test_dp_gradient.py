"""dp.mechanism = "gradient" (the paper's): each local step's gradient of the uploaded rows is clipped
to dp.clip and the upload gets noise sigma * S; S (dp.gradient_sensitivity, docs/privacy.md) is the
exact worst case of how far the clipped steps can move the upload from the zero-gradient trajectory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pfedmoap import algorithms, config, dp
from pfedmoap.algorithms.base import ClientData, Setup
from pfedmoap.clip.prompt import PromptEncoder


def _sgd(start: torch.Tensor, grads, lrs, momentum, wd) -> torch.Tensor:
    """torch's SGD from `start` with the given loss gradients (weight decay added by the optimiser)."""
    p = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=1.0, momentum=momentum, weight_decay=wd)
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _coefficients(lrs, momentum, wd) -> np.ndarray:
    """c_t by brute force: the displacement a unit gradient at step t alone causes (float64)."""
    start = torch.zeros(1, dtype=torch.float64)
    null = _sgd(start, [torch.zeros(1, dtype=torch.float64)] * len(lrs), lrs, momentum, wd)
    out = []
    for t in range(len(lrs)):
        grads = [torch.zeros(1, dtype=torch.float64) for _ in lrs]
        grads[t] = torch.ones(1, dtype=torch.float64)
        out.append(float(_sgd(start, grads, lrs, momentum, wd) - null))
    return np.array(out)


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.5, 0.3)])
def test_sensitivity_is_the_exact_worst_case_of_torch_sgd(momentum, wd):
    lrs = [1e-5] * 3 + [0.002 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4) for _ in range(5)]
    c = _coefficients(lrs, momentum, wd)
    S = dp.gradient_sensitivity(lrs, momentum, wd)
    assert S == pytest.approx(np.abs(c).sum(), rel=1e-9)
    # attained: every step's gradient of norm C along one direction, signed as its coefficient
    C, u = 0.7, torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    start = torch.randn(8, dtype=torch.float64)
    null = _sgd(start, [torch.zeros(8, dtype=torch.float64)] * len(lrs), lrs, momentum, wd)
    worst = _sgd(start, [C * float(np.sign(ct)) * u for ct in c], lrs, momentum, wd)
    assert float((worst - null).norm()) == pytest.approx(C * S, rel=1e-9)
    # and never exceeded by gradients of norm <= C
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.nn.functional.normalize(torch.randn(8, generator=g, dtype=torch.float64), dim=0)
                 * C * float(torch.rand(1, generator=g)) for _ in lrs]
        assert float((_sgd(start, grads, lrs, momentum, wd) - null).norm()) <= C * S * (1 + 1e-12)


def test_plain_sgd_sensitivity_is_the_sum_of_the_learning_rates():
    assert dp.gradient_sensitivity([0.1, 0.2, 0.3], 0.0, 0.0) == pytest.approx(0.6)
    assert dp.gradient_sensitivity([], 0.9, 5e-4) == 0.0
    # momentum mu: a step's gradient keeps moving the prompt by lr * (1 + mu + mu^2 + ...)
    assert dp.gradient_sensitivity([0.1, 0.1], 0.5, 0.0) == pytest.approx(0.1 * 1.5 + 0.1)


@pytest.mark.parametrize("method", ["promptfl", "pfedmoap", "fedper"])
def test_training_stays_within_the_sensitivity_of_its_schedule(method, tiny_backbone):
    """A client's trained uploaded rows (no noise) lie within C * S of the zero-gradient trajectory
    from the same start, S computed from `step_lrs`: the schedule and batches train_prompt runs."""
    C = 0.05
    cfg = config.load(None, [f"algorithm={method}", "prompt.n_ctx=4", *(["moe.n_experts=1"] if method == "pfedmoap" else []),
                             "train.local_epochs=3",
                             "train.batch_size=8", "train.lr=0.5", "train.warmup_epochs=1", "train.warmup_lr=0.1",
                             f"dp.clip={C}", "dp.noise_multiplier=0"])
    enc = PromptEncoder(tiny_backbone, ["a", "b", "c"], 4)
    m = algorithms.get(method)(Setup(cfg, 2, enc, tiny_backbone, (4, 64)))
    client = m.client()
    g = torch.Generator().manual_seed(0)
    n = 21                                   # 2 full batches of 8 per epoch, the last 5 dropped
    data = ClientData(torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=-1),
                      torch.randint(3, (n,), generator=g), torch.zeros(0, 128), torch.zeros(0, dtype=torch.long))
    state = client.init_state(0)
    start = state.ctx.clone()
    clipped = []
    orig = dp.clip_gradient_

    def spy(grad, clip):
        before = float(grad.norm())
        orig(grad, clip)
        clipped.append((before, float(grad.norm())))
    lrs = client.step_lrs(n)
    assert len(lrs) == 3 * 2 and lrs[:2] == [0.1, 0.1]
    try:
        dp.clip_gradient_ = spy
        client.train_prompt(state, data, 0, 0) if method != "fedper" else client.fit(state, data, 0, 0, {})
    finally:
        dp.clip_gradient_ = orig
    assert len(clipped) == len(lrs) and any(b > C for b, _ in clipped)      # the clip was active
    assert all(a <= C * (1 + 1e-5) for _, a in clipped)
    t = cfg.train
    rows = client.released_rows()
    null = _sgd(start[rows].double(), [torch.zeros_like(start[rows].double())] * len(lrs), lrs, t.momentum,
                t.weight_decay)
    moved = float((state.ctx[rows].double() - null).norm())
    S = dp.gradient_sensitivity(lrs, t.momentum, t.weight_decay)
    assert 0 < moved <= C * S * (1 + 1e-4)
