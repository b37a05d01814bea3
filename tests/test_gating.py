"""The client-side gating network and the mixed logits of pFedMoAP (the paper §3, src/pfedmoap/clip/gating.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfedmoap import algorithms, config
from pfedmoap.algorithms.base import ClientData, Setup
from pfedmoap.clip.gating import GatingNetwork, moe_logits
from pfedmoap.clip.prompt import PromptEncoder
from pfedmoap.errors import PFedMoAPError

S = 14.285714   # a logit scale (exp(log(1/0.07)), CLIP's init)


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _gating(embed_dim=128, dim=128, heads=8, scaling=10.0, seed=0):
    torch.manual_seed(seed)
    return GatingNetwork(embed_dim, dim, heads, scaling)


def _official_moe(g: GatingNetwork, f, T, s, lam):
    """The reference code's computation (ljaiverson/pFedMoAP, trainers/pfedmoap.py: CustomCLIP.forward
    and its MultiheadAttention), stated independently with torch.nn.MultiheadAttention and g's weights.

    There, each class is a batch entry of the attention: the queries are the B pooled image features
    (the same for every class), the keys and values the K pooled text features of that class, local
    first; scores are scaled by `scaling` (not 1/sqrt(d_head)); softmax over the K; the output
    projection gives the mixed text feature, and the logits are
    lam * local + logit_scale * <pooled image feature, mixed text feature>.
    Returns (logits (B, C), head-averaged attention weights (B, C, K))."""
    B, (K, C, D) = f.shape[0], T.shape
    d, h = g.dim, g.heads
    r = D // d
    pf, pT = f[:, ::r], T[..., ::r]                       # strided pooling, every r-th coordinate
    mha = torch.nn.MultiheadAttention(d, h, dropout=0.0, bias=True, batch_first=True,
                                      dtype=f.dtype)
    # nn.MultiheadAttention scales queries by 1/sqrt(d_head); the reference code by `scaling`
    a = g.scaling * math.sqrt(d // h)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([g.w_q.weight * a, g.w_k.weight, g.w_v.weight]))
        mha.in_proj_bias.copy_(torch.cat([g.w_q.bias * a, g.w_k.bias, g.w_v.bias]))
        mha.out_proj.weight.copy_(g.w_o.weight)
        mha.out_proj.bias.copy_(g.w_o.bias)
    q = pf.unsqueeze(0).expand(C, B, d)                   # (C, B, d): a batch of classes
    kv = pT.permute(1, 0, 2)                              # (C, K, d)
    mixed, weights = mha(q, kv, kv, need_weights=True, average_attn_weights=True)   # (C, B, d), (C, B, K)
    moe = s * torch.bmm(pf.unsqueeze(1), mixed.permute(1, 2, 0)).squeeze(1)           # (B, C)
    return lam * (s * f @ T[0].t()) + moe, weights.permute(1, 0, 2)


def test_shapes():
    g = _gating()
    f, T = _unit(5, 128, seed=1), _unit(4, 7, 128, seed=2)
    t_moe, w = g(f, T)
    assert t_moe.shape == (5, 7, 128) and w.shape == (5, 7, 4)
    logits, w2 = moe_logits(g, f, T, S, 0.5)
    assert logits.shape == (5, 7) and w2.shape == (5, 7, 4)


@pytest.mark.parametrize("embed_dim, dim, heads, scaling", [(128, 128, 8, 10.0), (256, 64, 4, 3.0),
                                                         (512, 128, 1, 1.0)])
def test_matches_the_reference_codes_attention(embed_dim, dim, heads, scaling):
    g = _gating(embed_dim, dim, heads, scaling).double()
    f, T = _unit(3, embed_dim, seed=3).double(), _unit(4, 5, embed_dim, seed=4).double()
    with torch.no_grad():
        logits, w = moe_logits(g, f, T, S, 0.3)
        ref, ref_w = _official_moe(g, f, T, S, 0.3)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-10)
    # the comparison has teeth: the MoE term is a sizeable part of the logits, and 1/sqrt(d_head)
    # instead of `scaling` (nn.MultiheadAttention's default) would give other weights
    with torch.no_grad():
        local = S * f @ T[0].t()
        assert (logits - 0.3 * local).abs().max() > 1e-2
        g2 = _gating(embed_dim, dim, heads, 1 / math.sqrt(dim // heads)).double()
        g2.load_state_dict(g.state_dict())
        assert (moe_logits(g2, f, T, S, 0.3)[1] - ref_w).abs().max() > 1e-3


def _grads(g: GatingNetwork, loss) -> dict[str, torch.Tensor]:
    g.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in g.named_parameters()}


def test_which_gating_parameters_get_gradients_float64():
    """Exactly zero, whatever the data: the key bias (it adds <q, b_k> to every expert's score, and
    softmax ignores a shift); under cross-entropy also the value and output biases (the weights sum
    to one, so b_v and b_o shift T_MoE by the same vector for every class, and its dot product with
    the image feature shifts every class's logit alike; softmax ignores that too). Every weight
    matrix and the query bias do get gradients. Float64, so zero is ~1e-16, not float32 noise."""
    g = _gating(256, 128, 8, 10.0).double()
    f, T = _unit(6, 256, seed=20).double(), _unit(4, 5, 256, seed=21).double()
    y = torch.arange(6) % 5
    ce = _grads(g, F.cross_entropy(moe_logits(g, f, T, S, 0.5)[0], y))
    for name in ("w_q.weight", "w_q.bias", "w_k.weight", "w_v.weight", "w_o.weight"):
        assert ce[name].abs().max() > 1e-4, name
    for name in ("w_k.bias", "w_v.bias", "w_o.bias"):
        assert ce[name].abs().max() < 1e-13, (name, ce[name].abs().max())
    # b_v and b_o do move the logits themselves (every class alike), b_k not even those
    raw = _grads(g, moe_logits(g, f, T, S, 0.5)[0].pow(2).sum())
    assert raw["w_v.bias"].abs().max() > 1e-3 and raw["w_o.bias"].abs().max() > 1e-3
    assert raw["w_k.bias"].abs().max() < 1e-12
    # ... and they shift each image's row of logits by one constant
    with torch.no_grad():
        before = moe_logits(g, f, T, S, 0.5)[0]
        g.w_v.bias.add_(torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
        g.w_o.bias.add_(torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
        shift = moe_logits(g, f, T, S, 0.5)[0] - before
    assert shift.abs().max() > 1e-2
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-12, rtol=0)


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


# ------------------------------------------------------------------ one training step of the method's client

def _pfedmoap(backbone, *sets):
    cfg = config.load(None, ["model.name=tiny-clip", "model.pretrained=", "prompt.n_ctx=4",
                             "train.local_epochs=1", "train.warmup_epochs=0", "train.batch_size=8",
                             "train.weight_decay=0", *sets])
    classnames = ["cat", "dog", "water lily", "car"]
    enc = PromptEncoder(backbone, classnames, cfg.prompt.n_ctx)
    setup = Setup(cfg, n_clients=4, encoder=enc, backbone=backbone,
                             ctx_shape=(cfg.prompt.n_ctx, backbone.model.token_embedding.weight.shape[1]))
    return algorithms.get("pfedmoap")(setup).client(), enc


def _data(n=8, C=4, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    y = torch.arange(n) % C
    return ClientData(x, y, x.clone(), y.clone())


def _expert_downloads(client, cids, n_experts, seed):
    """What the server sends: the experts' prompts (flat rows), without their ids."""
    rows = torch.randn(n_experts, client.ctx_shape[0] * client.ctx_shape[1],
                       generator=torch.Generator().manual_seed(seed)) * 0.02
    return {cid: {"experts": rows.numpy()} for cid in cids}


def test_gradients_reach_ctx_and_gating_only(tiny_backbone):
    client, enc = _pfedmoap(tiny_backbone)
    state = client.init_state(0)
    assert state.gating is not None and state.gating_opt is not None
    experts = enc.encode_frozen(torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1)) * 0.02)
    data = _data()
    ctx = state.ctx.clone().requires_grad_(True)
    text = torch.cat([enc(ctx).unsqueeze(0), experts])
    logits, w = moe_logits(state.gating, data.train_x, text, client.logit_scale, client.options.lam)
    assert w is not None and w.shape == (8, 4, 4)
    F.cross_entropy(logits, data.train_y).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in state.gating.named_parameters()}
    assert all(g is not None for g in grads.values())
    scale = max(float(g.abs().max()) for g in grads.values())
    for name in ("w_q.weight", "w_q.bias", "w_k.weight", "w_v.weight", "w_o.weight"):
        assert grads[name].abs().max() > 1e-3 * scale, name
    # zero up to float32 rounding (test_which_gating_parameters_get_gradients_float64)
    for name in ("w_k.bias", "w_v.bias", "w_o.bias"):
        assert grads[name].abs().max() < 1e-4 * scale, name
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert not experts.requires_grad


def test_fit_updates_ctx_and_gating_and_leaves_backbone_untouched(tiny_backbone):
    client, enc = _pfedmoap(tiny_backbone, "train.lr=0.5", "moe.gating_lr=0.5")
    state = client.init_state(0)
    before_backbone = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    ctx0 = state.ctx.clone()
    gating0 = {n: p.detach().clone() for n, p in state.gating.named_parameters()}
    client.prepare(0, _expert_downloads(client, [0], 2, seed=2))
    up = client.fit(state, _data(), 0, 0, {})
    assert up["prompt"].shape == (ctx0.numel(),) and list(up["n_samples"]) == [8]
    assert not state.ctx.requires_grad and state.ctx.shape == ctx0.shape
    assert (state.ctx - ctx0).abs().max() > 0
    moved = {n: float((p.detach() - gating0[n]).abs().max()) for n, p in state.gating.named_parameters()}
    for name in ("w_q.weight", "w_q.bias", "w_k.weight", "w_v.weight", "w_o.weight"):
        assert moved[name] > 1e-3 * max(moved.values()), (name, moved)
    # no weight decay here, and zero gradients up to float32 rounding: these stay where they were
    for name in ("w_k.bias", "w_v.bias", "w_o.bias"):
        assert moved[name] < 1e-4 * max(moved.values()), (name, moved)
    # the gating optimiser's momentum is the client's and now non-zero
    assert any(state.gating_opt.state[p]["momentum_buffer"].abs().sum() > 0 for p in state.gating.parameters())
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before_backbone[k], after[k]) for k in before_backbone)
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def test_fit_without_experts_leaves_gating_alone(tiny_backbone):
    """First round (K = 1): logits are the local ones, so the gating network gets no gradient."""
    client, _ = _pfedmoap(tiny_backbone, "train.lr=0.5")
    state = client.init_state(1)
    gating0 = {n: p.detach().clone() for n, p in state.gating.named_parameters()}
    ctx0 = state.ctx.clone()
    client.fit(state, _data(seed=1), 0, 1, {})
    assert (state.ctx - ctx0).abs().max() > 0
    for n, p in state.gating.named_parameters():
        assert torch.equal(p.detach(), gating0[n]), n


def test_gating_dim_not_dividing_embed_dim_fails_at_client_init(tiny_backbone):
    client, _ = _pfedmoap(tiny_backbone, "moe.gating_dim=96", "moe.gating_heads=8")
    with pytest.raises(PFedMoAPError, match="gating_dim"):
        client.init_state(0)


def test_fit_with_no_training_images_is_a_no_op(tiny_backbone):
    client, _ = _pfedmoap(tiny_backbone)
    state = client.init_state(2)
    ctx0 = state.ctx.clone()
    gating0 = {n: p.detach().clone() for n, p in state.gating.named_parameters()}
    empty = torch.zeros(0, 128)
    data = ClientData(empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long))
    up = client.fit(state, data, 0, 2, {})
    assert list(up["n_samples"]) == [0]
    assert torch.equal(state.ctx, ctx0)
    for n, p in state.gating.named_parameters():
        assert torch.equal(p.detach(), gating0[n]), n
