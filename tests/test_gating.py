"""The client-side gating network and the mixed logits of pFedMoAP (DESIGN.md section 1)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pfedmoap import algorithms, config
from pfedmoap.clip.gating import GatingNetwork, moe_logits
from pfedmoap.clip.prompt import PromptEncoder
from pfedmoap.errors import PFedMoAPError

S = 14.285714   # a logit scale (exp(log(1/0.07)), CLIP's init)


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _gating(embed_dim=128, dim=128, heads=8, scaling=10.0, seed=0):
    torch.manual_seed(seed)
    return GatingNetwork(embed_dim, dim, heads, scaling)


def _reference_moe(g: GatingNetwork, f, T, s, lam):
    """DESIGN.md section 1, written out with loops: per image b, class c and head h."""
    B, (_, C, D) = f.shape[0], T.shape
    d, h = g.dim, g.heads
    dh = d // h
    r = D // d
    pf, pT = f[:, ::r], T[..., ::r]
    local = s * f @ T[0].t()
    out = torch.zeros(B, C)
    for b in range(B):
        q = g.w_q(pf[b])
        for c in range(C):
            keys, vals = g.w_k(pT[:, c]), g.w_v(pT[:, c])          # (K, d)
            heads = []
            for i in range(h):
                sl = slice(i * dh, (i + 1) * dh)
                w = torch.softmax((keys[:, sl] @ q[sl]) * g.scaling, dim=0)   # over K
                heads.append(w @ vals[:, sl])
            t_moe = g.w_o(torch.cat(heads))
            out[b, c] = s * pf[b] @ t_moe
    return lam * local + out


def test_shapes():
    g = _gating()
    f, T = _unit(5, 128, seed=1), _unit(4, 7, 128, seed=2)
    t_moe, w = g(f, T)
    assert t_moe.shape == (5, 7, 128) and w.shape == (5, 7, 4)
    logits, w2 = moe_logits(g, f, T, S, 0.5)
    assert logits.shape == (5, 7) and w2.shape == (5, 7, 4)


@pytest.mark.parametrize("embed_dim, dim, heads, scaling", [(128, 128, 8, 10.0), (256, 64, 4, 3.0)])
def test_matches_written_out_reference(embed_dim, dim, heads, scaling):
    g = _gating(embed_dim, dim, heads, scaling)
    f, T = _unit(3, embed_dim, seed=3), _unit(4, 5, embed_dim, seed=4)
    with torch.no_grad():
        logits, _ = moe_logits(g, f, T, S, 0.3)
        ref = _reference_moe(g, f, T, S, 0.3)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-5)


def test_single_expert_gives_local_logits_exactly():
    g = _gating()
    f, T = _unit(6, 128, seed=5), _unit(1, 9, 128, seed=6)
    logits, w = moe_logits(g, f, T, S, 0.5)
    assert w is None
    assert torch.equal(logits, S * f @ T[0].t())
    # with experts the result is not the local logits (nor lam times them)
    T2 = torch.cat([T, _unit(2, 9, 128, seed=7)])
    logits2, _ = moe_logits(g, f, T2, S, 0.5)
    assert (logits2 - logits).abs().max() > 1e-3
    assert (logits2 - 0.5 * logits).abs().max() > 1e-3


def test_permuting_non_local_experts_keeps_logits():
    g = _gating()
    f, T = _unit(4, 128, seed=8), _unit(6, 5, 128, seed=9)
    logits, w = moe_logits(g, f, T, S, 0.5)
    perm = torch.tensor([0, 3, 5, 1, 4, 2])
    logits_p, w_p = moe_logits(g, f, T[perm], S, 0.5)
    torch.testing.assert_close(logits_p, logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(w_p, w[..., perm], atol=1e-6, rtol=1e-5)
    # but swapping the local prompt with an expert does change them (the local one is special)
    swap = torch.tensor([1, 0, 2, 3, 4, 5])
    logits_s, _ = moe_logits(g, f, T[swap], S, 0.5)
    assert (logits_s - logits).abs().max() > 1e-3


def test_gating_weights_are_a_distribution_over_experts():
    g = _gating()
    f, T = _unit(4, 128, seed=10), _unit(5, 3, 128, seed=11)
    _, w = g(f, T)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 3), atol=1e-5, rtol=0)
    assert w.std() > 1e-4            # not uniform: the weights depend on the inputs


def test_pool_keeps_every_rth_coordinate():
    g = _gating(embed_dim=512, dim=128)
    x = torch.arange(2 * 512, dtype=torch.float32).reshape(2, 512)
    p = g.pool(x)
    assert p.shape == (2, 128)
    assert torch.equal(p, x[:, ::4])
    assert p[0, :3].tolist() == [0.0, 4.0, 8.0] and p[1, 0] == 512
    assert torch.equal(_gating(128, 128).pool(x[:, :128]), x[:, :128])


def test_gating_sees_only_pooled_coordinates():
    """Changing the coordinates pool() drops changes the local logits but not the MoE part."""
    g = _gating(embed_dim=256, dim=128)
    f, T = _unit(3, 256, seed=12), _unit(3, 4, 256, seed=13)
    noise = torch.randn(3, 256, generator=torch.Generator().manual_seed(14))
    noise[:, ::2] = 0
    t1, w1 = g(f, T)
    t2, w2 = g(f + noise, T)
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(w1, w2)


@pytest.mark.parametrize("embed_dim, dim", [(200, 128), (100, 128), (128, 96)])
def test_embed_dim_not_divisible_raises(embed_dim, dim):
    with pytest.raises(PFedMoAPError, match="gating_dim"):
        GatingNetwork(embed_dim, dim, 8)


# ------------------------------------------------------------------ one training step of the algorithm

def _pfedmoap(backbone, *sets):
    cfg = config.load(None, ["model.name=tiny-clip", "model.pretrained=", "prompt.n_ctx=4",
                             "train.local_epochs=1", "train.warmup_epochs=0", "train.batch_size=8",
                             "train.weight_decay=0", *sets])
    classnames = ["cat", "dog", "water lily", "car"]
    enc = PromptEncoder(backbone, classnames, cfg.prompt.n_ctx)
    return algorithms.get("pfedmoap")(cfg, enc, backbone), enc


def _data(n=8, C=4, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    y = torch.arange(n) % C
    return algorithms.ClientData(x, y, x.clone(), y.clone())


def test_gradients_reach_ctx_and_gating_only(tiny_backbone):
    algo, enc = _pfedmoap(tiny_backbone)
    state = algo.init_client(0)
    assert state.gating is not None and state.gating_opt is not None
    experts = enc.encode_frozen(torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1)) * 0.02)
    data = _data()
    ctx = state.ctx.clone().requires_grad_(True)
    text = torch.cat([enc(ctx).unsqueeze(0), experts])
    logits, w = algo.logits(state, data.train_x, text)
    assert w is not None and w.shape == (8, 4, 4)
    F.cross_entropy(logits, data.train_y).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in state.gating.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name in ("w_q.weight", "w_q.bias", "w_k.weight", "w_v.weight", "w_v.bias", "w_o.weight", "w_o.bias"):
        assert grads[name].abs().sum() > 0, name
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert not experts.requires_grad


def test_fit_updates_ctx_and_gating_and_leaves_backbone_untouched(tiny_backbone):
    algo, enc = _pfedmoap(tiny_backbone, "train.lr=0.5", "moe.gating_lr=0.5")
    state = algo.init_client(0)
    before_backbone = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    ctx0 = state.ctx.clone()
    gating0 = {n: p.detach().clone() for n, p in state.gating.named_parameters()}
    experts = enc.encode_frozen(torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2)) * 0.02)
    loss = algo.fit(state, _data(), 0, 0, None, experts)
    assert math.isfinite(loss)
    assert not state.ctx.requires_grad and state.ctx.shape == ctx0.shape
    assert (state.ctx - ctx0).abs().max() > 0
    for name in ("w_q.weight", "w_k.weight", "w_v.weight", "w_o.weight", "w_o.bias"):
        assert (dict(state.gating.named_parameters())[name] - gating0[name]).abs().max() > 0, name
    # the gating optimiser's momentum is the client's and now non-zero
    assert any(state.gating_opt.state[p]["momentum_buffer"].abs().sum() > 0 for p in state.gating.parameters())
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before_backbone[k], after[k]) for k in before_backbone)
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def test_fit_without_experts_leaves_gating_alone(tiny_backbone):
    """First round (K = 1): logits are the local ones, so the gating network gets no gradient."""
    algo, enc = _pfedmoap(tiny_backbone, "train.lr=0.5")
    state = algo.init_client(1)
    gating0 = {n: p.detach().clone() for n, p in state.gating.named_parameters()}
    ctx0 = state.ctx.clone()
    algo.fit(state, _data(seed=1), 0, 1, None, None)
    assert (state.ctx - ctx0).abs().max() > 0
    for n, p in state.gating.named_parameters():
        assert torch.equal(p.detach(), gating0[n]), n


def test_gating_dim_not_dividing_embed_dim_fails_at_client_init(tiny_backbone):
    algo, _ = _pfedmoap(tiny_backbone, "moe.gating_dim=96", "moe.gating_heads=8")
    with pytest.raises(PFedMoAPError, match="gating_dim"):
        algo.init_client(0)


def test_fit_with_no_training_images_is_a_no_op(tiny_backbone):
    algo, _ = _pfedmoap(tiny_backbone)
    state = algo.init_client(2)
    ctx0 = state.ctx.clone()
    empty = torch.zeros(0, 128)
    data = algorithms.ClientData(empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long))
    loss = algo.fit(state, data, 0, 2, None, None)
    assert math.isnan(loss)
    assert torch.equal(state.ctx, ctx0)
