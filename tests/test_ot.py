"""FedOTP's entropic OT plan (pfedmoap.ot): reference iteration, POT, marginals, stop rules, fp16."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfedmoap.ot import OTOptions, ot_logits, ot_plan



def clip_like_cost(P, M=49, N=2, mean=0.2, spread=0.05, seed=0, dtype=torch.float64):
    """1 - cosine similarities shaped like CLIP patch/prompt similarities (around 0.2)."""
    g = torch.Generator().manual_seed(seed)
    sim = mean + spread * torch.randn(P, M, N, generator=g, dtype=torch.float64)
    return (1.0 - sim).to(dtype)


def scaling_domain_reference(cost, method, eps, top_percent, thresh, max_iter):
    """The reference's iteration (GLP_OT.py: entropic_COT_fast / Sinkhorn) written in the scaling
    domain in float64, with its batch-wide stop rule. Returns (T, iterations)."""
    P, M, N = cost.shape
    K = torch.exp(-cost / eps)
    a = torch.full((P, M), 1.0 / M, dtype=cost.dtype)
    b = torch.full((P, N), (top_percent if method == "cot" else 1.0) / N, dtype=cost.dtype)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for it in range(1, max_iter + 1):
        u_prev, v_prev = u, v
        u = a / torch.einsum("pmn,pn->pm", K, v)
        if method == "cot":
            u = torch.minimum(u, torch.ones_like(u))
        v = b / torch.einsum("pmn,pm->pn", K, u)
        err = (v - v_prev).abs().mean() if method == "cot" else (u - u_prev).abs().mean()
        if err.item() < thresh:
            break
    return u[:, :, None] * K * v[:, None, :], it


@pytest.mark.parametrize("method,top_percent", [("cot", 0.8), ("cot", 0.5), ("cot", 1.0), ("sinkhorn", 1.0)])
def test_batch_rule_reproduces_the_reference_iteration(method, top_percent):
    cost = clip_like_cost(6, seed=1)
    opts = OTOptions(method=method, eps=0.1, top_percent=top_percent, stop="batch")
    T, n_iter = ot_plan(cost, opts)
    T_ref, it_ref = scaling_domain_reference(cost, method, 0.1, top_percent, opts.thresh, opts.max_iter)
    assert T.dtype == torch.float64
    assert (n_iter == it_ref).all()
    torch.testing.assert_close(T, T_ref, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("eps,top_percent", [(0.1, 0.8), (0.05, 0.8), (0.1, 0.5), (0.05, 0.3)])
def test_cot_equals_pot_entropic_partial_wasserstein(eps, top_percent):
    ot = pytest.importorskip("ot")   # POT, the independent solver
    P, M, N = 4, 49, 2
    cost = clip_like_cost(P, M, N, spread=0.08, seed=2)
    T, n_iter = ot_plan(cost, OTOptions(eps=eps, top_percent=top_percent, thresh=1e-12, max_iter=5000))
    assert (n_iter < 5000).all()
    for p in range(P):
        T_pot = ot.partial.entropic_partial_wasserstein(
            np.full(M, 1.0 / M), np.full(N, top_percent / N), cost[p].numpy(), eps,
            m=None, numItermax=100000, stopThr=1e-16)   # m = min(sum a, sum b) = top_percent
        np.testing.assert_allclose(T[p].numpy(), T_pot, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("eps", [0.1, 0.03])
def test_sinkhorn_equals_pot_sinkhorn(eps):
    ot = pytest.importorskip("ot")
    P, M, N = 4, 49, 2
    cost = clip_like_cost(P, M, N, spread=0.08, seed=3)
    T, _ = ot_plan(cost, OTOptions(method="sinkhorn", eps=eps, thresh=1e-12, max_iter=5000))
    for p in range(P):
        T_pot = ot.sinkhorn(np.full(M, 1.0 / M), np.full(N, 1.0 / N), cost[p].numpy(), eps,
                            method="sinkhorn_log", numItermax=100000, stopThr=1e-15)
        np.testing.assert_allclose(T[p].numpy(), T_pot, rtol=1e-8, atol=1e-14)


def test_cot_equals_brute_force_dual_on_a_tiny_problem():
    """M = 3, N = 2: maximise the concave dual <f,a> + <g,b> - eps sum exp((f_i+g_j-C_ij)/eps)
    over f <= 0 by projected gradient ascent in float64, independently of any OT code."""
    C = torch.tensor([[0.1, 0.5], [0.4, 0.2], [0.9, 0.8]], dtype=torch.float64)
    eps, tp = 0.2, 0.6
    a, b = torch.full((3,), 1 / 3, dtype=torch.float64), torch.full((2,), tp / 2, dtype=torch.float64)
    f = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([f, g], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        fc = f.clamp(max=0)                                     # f <= 0 (u <= 1)
        loss = -(fc @ a + g @ b - eps * torch.exp((fc[:, None] + g[None, :] - C) / eps).sum())
        loss.backward()
        return loss
    for _ in range(20):
        opt.step(closure)
    with torch.no_grad():
        fc = f.clamp(max=0)
        T_dual = torch.exp((fc[:, None] + g[None, :] - C) / eps)
    T, _ = ot_plan(C[None], OTOptions(eps=eps, top_percent=tp, thresh=1e-14, max_iter=10000))
    torch.testing.assert_close(T[0], T_dual, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("max_iter", [1, 3, 100])
def test_cot_columns_are_exact_after_every_sweep(max_iter):
    P, M, N, tp = 10, 49, 2, 0.8
    cost = clip_like_cost(P, M, N, spread=0.1, seed=4, dtype=torch.float32)
    T, _ = ot_plan(cost, OTOptions(top_percent=tp, max_iter=max_iter))
    assert T.dtype == torch.float32 and (T >= 0).all()
    torch.testing.assert_close(T.sum(1), torch.full((P, N), tp / N), rtol=1e-5, atol=0)


def test_cot_marginals_at_convergence():
    P, M, N, tp = 10, 49, 2, 0.8
    cost = clip_like_cost(P, M, N, spread=0.1, seed=4, dtype=torch.float32)
    T, n_iter = ot_plan(cost, OTOptions(top_percent=tp, thresh=1e-6, max_iter=2000))
    assert (n_iter < 2000).all()
    # columns = top_percent/N, rows capped at 1/M, total mass top_percent
    torch.testing.assert_close(T.sum(1), torch.full((P, N), tp / N), rtol=1e-5, atol=0)
    rows = T.sum(2) * M
    assert (rows <= 1 + 1e-4).all()
    torch.testing.assert_close(T.sum((1, 2)), torch.full((P,), tp), rtol=1e-5, atol=0)
    # the cap binds: some patches send all their mass, some less (partial transport)
    assert (rows > 1 - 1e-4).any() and (rows < 0.9).any()


def test_sinkhorn_marginals():
    P, M, N = 10, 49, 2
    cost = clip_like_cost(P, M, N, spread=0.1, seed=5, dtype=torch.float32)
    T, n_iter = ot_plan(cost, OTOptions(method="sinkhorn", thresh=1e-5, max_iter=2000))
    assert (n_iter < 2000).all()
    torch.testing.assert_close(T.sum(1), torch.full((P, N), 1.0 / N), rtol=1e-5, atol=0)
    torch.testing.assert_close(T.sum(2), torch.full((P, M), 1.0 / M), rtol=1e-4, atol=0)


def test_top_percent_one_runs_to_the_iteration_cap():
    """top_percent = 1 makes COT balanced; its clipped iteration creeps (the potentials of a
    balanced problem are free up to a shift, which u <= 1 pins only at the boundary), so with
    the reference's thresh 1e-3 / max_iter 100 no problem stops early, while 0.8 stops early."""
    cost = clip_like_cost(64, seed=6, dtype=torch.float32)
    _, n_full = ot_plan(cost, OTOptions(top_percent=1.0))
    _, n_part = ot_plan(cost, OTOptions(top_percent=0.8))
    assert (n_full == 100).all()
    assert n_part.max() < 50
    _, n_batch = ot_plan(cost, OTOptions(top_percent=1.0, stop="batch"))
    assert (n_batch == 100).all()
    # it does converge eventually, to the balanced (Sinkhorn) plan
    cost64 = cost[:4].double()
    T, n = ot_plan(cost64, OTOptions(top_percent=1.0, thresh=1e-10, max_iter=200000))
    assert (n > 100).all() and (n < 200000).all()
    T_s, _ = ot_plan(cost64, OTOptions(method="sinkhorn", thresh=1e-12, max_iter=5000))
    torch.testing.assert_close(T, T_s, rtol=1e-6, atol=1e-12)


def _features(B, C, M=49, N=2, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(D, generator=g)   # a common direction: similarities ~ CLIP's, not ~ 0
    patches = (torch.randn(B, M, D, generator=g) + 0.5 * shared).to(dtype)
    texts = (torch.randn(N, C, D, generator=g) + 0.5 * shared).to(dtype)
    return patches, texts


def test_logits_are_scale_times_plan_weighted_similarity():
    patches, texts = _features(3, 5)
    opts = OTOptions(eps=0.05)
    logits, T = ot_logits(patches, texts, 100.0, opts, return_plan=True)
    assert logits.shape == (3, 5) and T.shape == (3, 5, 49, 2)
    x, t = F.normalize(patches, dim=-1), F.normalize(texts, dim=-1)
    for b in range(3):
        for c in range(5):
            sim = x[b] @ t[:, c].T                                   # (M, N)
            T_bc, _ = ot_plan((1 - sim)[None], opts)
            torch.testing.assert_close(T[b, c], T_bc[0], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(logits[b, c], 100.0 * (T_bc[0] * sim).sum(), rtol=1e-5, atol=1e-5)


def test_gradient_flows_through_similarity_only():
    patches, texts = _features(2, 4)
    patches.requires_grad_(True)
    texts.requires_grad_(True)
    scale = torch.tensor(50.0, requires_grad=True)
    logits, T = ot_logits(patches, texts, scale, return_plan=True)
    assert not T.requires_grad
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    gp, gt, gs = torch.autograd.grad((logits * w).sum(), [patches, texts, scale])

    # the same with the plan held fixed by hand: identical gradients (no path through T)
    p2, t2 = patches.detach().requires_grad_(True), texts.detach().requires_grad_(True)
    sim = torch.einsum("bmd,ncd->bcmn", F.normalize(p2, dim=-1), F.normalize(t2, dim=-1))
    manual = scale.detach() * (T * sim).sum((-2, -1))
    gp2, gt2 = torch.autograd.grad((manual * w).sum(), [p2, t2])
    torch.testing.assert_close(gp, gp2)
    torch.testing.assert_close(gt, gt2)
    torch.testing.assert_close(gs, (logits.detach() / 50.0 * w).sum())
    assert gt.abs().sum() > 0


def test_per_problem_stop_makes_logits_independent_of_the_batch():
    patches, texts = _features(6, 7, seed=3)
    patches[3:] = patches[3:] * 0 + torch.randn(3, 49, 32, generator=torch.Generator().manual_seed(9))
    for stop, independent in [("per_problem", True), ("batch", False)]:
        opts = OTOptions(eps=0.1, thresh=1e-2, stop=stop)
        together = ot_logits(patches, texts, 100.0, opts)
        alone = torch.cat([ot_logits(patches[i:i + 1], texts, 100.0, opts) for i in range(6)])
        if independent:
            torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-5)
        else:
            assert (together - alone).abs().max() > 1e-3


def test_per_problem_n_iter_is_each_problems_own():
    cost = torch.cat([clip_like_cost(3, seed=7, dtype=torch.float32),
                      clip_like_cost(3, spread=0.2, seed=8, dtype=torch.float32)])
    opts = OTOptions(eps=0.05)
    T, n_iter = ot_plan(cost, opts)
    for p in range(6):
        T_p, n_p = ot_plan(cost[p:p + 1], opts)
        assert n_p.item() == n_iter[p].item()
        torch.testing.assert_close(T_p[0], T[p], rtol=1e-6, atol=1e-12)
    assert len(set(n_iter.tolist())) > 1


def test_half_precision_inputs_with_eps_001_give_finite_plans():
    patches, texts = _features(4, 6, seed=5, dtype=torch.float16)
    # the hazard: exp(-cost/0.01) in fp16 underflows to 0 (the reference's K), so K v = 0 and u = 0/0
    sim16 = torch.einsum("bmd,ncd->bcmn", F.normalize(patches.float(), dim=-1),
                         F.normalize(texts.float(), dim=-1)).half()
    assert (torch.exp(-(1 - sim16) / 0.01) == 0).all(dim=(-2, -1)).any()
    T_naive, _ = scaling_domain_reference((1 - sim16).reshape(-1, 49, 2), "cot", 0.01, 0.8, 1e-3, 100)
    assert torch.isnan(T_naive).any()
    for method in ("cot", "sinkhorn"):
        opts = OTOptions(method=method, eps=0.01)
        logits, T = ot_logits(patches, texts, 100.0, opts, return_plan=True)
        assert logits.dtype == torch.float32 and T.dtype == torch.float32
        assert torch.isfinite(logits).all() and torch.isfinite(T).all()
        col = (0.8 if method == "cot" else 1.0) / 2
        torch.testing.assert_close(T.sum(-2), torch.full((4, 6, 2), col), rtol=1e-4, atol=0)
        # equals the float64 computation on the same (fp16-rounded) features
        ref = ot_logits(patches.double(), texts.double(), 100.0, opts)
        torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-3)


def test_options_are_validated():
    for bad in [dict(method="emd"), dict(stop="never"), dict(eps=0.0), dict(top_percent=0.0),
                dict(top_percent=1.5), dict(max_iter=0), dict(thresh=-1.0)]:
        with pytest.raises(ValueError):
            OTOptions(**bad)
    with pytest.raises(ValueError):
        ot_logits(torch.randn(2, 3, 8), torch.randn(2, 4, 9), 1.0)
    with pytest.raises(ValueError):
        ot_plan(torch.randn(3, 4))
