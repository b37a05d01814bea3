"""CoOp prompts spliced into open_clip's text path: exactness of both fast paths, gradients, init."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfedmoap.clip.prompt import PromptEncoder, context_length, init_context
from pfedmoap.errors import PFedMoAPError

PHRASE = "a photo of a"
NAMES = ["cat", "water lily", "great_white shark", "x", "bird of paradise flower"]
WIDTH = 64   # tiny-clip's text width


def _reference(backbone, names, template="a photo of a {}."):
    """open_clip's own encode_text on the hand-written prompts, L2-normalised."""
    with torch.no_grad():
        tokens = backbone.tokenizer([template.format(n.replace("_", " ")) for n in names])
        return F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


def _phrase_ctx(backbone):
    return init_context(backbone, 16, PHRASE, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_phrase_context_reproduces_encode_text(tiny_backbone, truncate, shared_prefix):
    ctx = _phrase_ctx(tiny_backbone)
    enc = PromptEncoder(tiny_backbone, NAMES, ctx.shape[0], truncate=truncate, shared_prefix=shared_prefix)
    feats = enc(ctx)
    ref = _reference(tiny_backbone, NAMES)
    assert feats.shape == (len(NAMES), tiny_backbone.embed_dim)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=0)
    # the check is not vacuous: the classes' features differ from each other
    assert (feats[0] - feats[1]).abs().max() > 1e-3


def test_other_context_does_not_match_encode_text(tiny_backbone):
    """A different ctx gives different features: the context really is spliced in."""
    ctx = _phrase_ctx(tiny_backbone)
    enc = PromptEncoder(tiny_backbone, NAMES, ctx.shape[0])
    other = enc(ctx + 0.5 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1)))
    assert (other - _reference(tiny_backbone, NAMES)).abs().max() > 1e-3


def test_features_are_unit_norm(tiny_backbone):
    ctx = init_context(tiny_backbone, 8, "", torch.Generator().manual_seed(3))
    feats = PromptEncoder(tiny_backbone, NAMES, 8)(ctx)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-5, rtol=0)


def _features_and_grad(backbone, ctx0, weights, **kw):
    enc = PromptEncoder(backbone, NAMES, ctx0.shape[0], **kw)
    ctx = ctx0.clone().requires_grad_(True)
    feats = enc(ctx)
    (feats * weights).sum().backward()
    return feats.detach(), ctx.grad.detach(), enc


def test_fast_paths_equal_plain_path_with_gradients(tiny_backbone):
    g = torch.Generator().manual_seed(5)
    ctx0 = init_context(tiny_backbone, 6, "", g)
    weights = torch.randn(len(NAMES), tiny_backbone.embed_dim, generator=g)
    f_plain, g_plain, enc_plain = _features_and_grad(tiny_backbone, ctx0, weights, truncate=False, shared_prefix=False)
    f_trunc, g_trunc, enc_trunc = _features_and_grad(tiny_backbone, ctx0, weights, truncate=True, shared_prefix=False)
    f_pref, g_pref, enc_pref = _features_and_grad(tiny_backbone, ctx0, weights, truncate=False, shared_prefix=True)
    f_both, g_both, enc_both = _features_and_grad(tiny_backbone, ctx0, weights, truncate=True, shared_prefix=True)
    # the fast paths are really taken
    assert enc_trunc.length < enc_plain.length == 77
    assert enc_pref.shared_prefix and enc_both.shared_prefix and not enc_plain.shared_prefix
    assert g_plain.abs().max() > 0
    for f, g_ in ((f_trunc, g_trunc), (f_pref, g_pref), (f_both, g_both)):
        torch.testing.assert_close(f, f_plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(g_, g_plain, atol=1e-5, rtol=1e-4)


def test_encode_frozen_matches_call_and_has_no_graph(tiny_backbone):
    g = torch.Generator().manual_seed(7)
    ctxs = torch.stack([init_context(tiny_backbone, 4, "", g) for _ in range(3)]).requires_grad_(True)
    enc = PromptEncoder(tiny_backbone, NAMES, 4)
    out = enc.encode_frozen(ctxs)
    assert out.shape == (3, len(NAMES), tiny_backbone.embed_dim)
    assert not out.requires_grad
    for i in range(3):
        torch.testing.assert_close(out[i], enc(ctxs[i].detach()), atol=1e-6, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_gradients_reach_ctx_and_no_backbone_parameter(tiny_backbone):
    params = list(tiny_backbone.model.parameters())
    assert params and all(not p.requires_grad for p in params)
    ctx = init_context(tiny_backbone, 4, "", torch.Generator().manual_seed(11)).requires_grad_(True)
    enc = PromptEncoder(tiny_backbone, NAMES, 4)
    feats = enc(ctx)
    assert feats.requires_grad
    logits = tiny_backbone.logit_scale * torch.randn(2, tiny_backbone.embed_dim) @ feats.t()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert ctx.grad is not None and ctx.grad.shape == ctx.shape
    assert ctx.grad.abs().sum() > 0 and torch.isfinite(ctx.grad).all()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())
    assert not tiny_backbone.model.training


def test_random_init_shape_and_std(tiny_backbone):
    ctx = init_context(tiny_backbone, 16, "", torch.Generator().manual_seed(0))
    assert ctx.shape == (16, WIDTH) and ctx.dtype == torch.float32
    assert abs(float(ctx.std()) - 0.02) < 0.002           # 1024 samples: std error ~2%
    assert abs(float(ctx.mean())) < 0.003
    again = init_context(tiny_backbone, 16, "", torch.Generator().manual_seed(0))
    other = init_context(tiny_backbone, 16, "", torch.Generator().manual_seed(1))
    assert torch.equal(ctx, again) and not torch.equal(ctx, other)
    assert init_context(tiny_backbone, 3, "", torch.Generator().manual_seed(0)).shape == (3, WIDTH)
    assert context_length(16, "", tiny_backbone) == 16


@pytest.mark.parametrize("phrase, n_tokens", [("a photo of a", 4), ("a", 1), ("a centered satellite photo of", 5)])
def test_phrase_init_sets_length_and_embeddings(tiny_backbone, phrase, n_tokens):
    ctx = init_context(tiny_backbone, 16, phrase, torch.Generator().manual_seed(0))
    assert context_length(16, phrase, tiny_backbone) == n_tokens
    assert ctx.shape == (n_tokens, WIDTH)
    emb = tiny_backbone.model.token_embedding.weight
    ids = tiny_backbone.tokenizer([phrase])[0][1:1 + n_tokens]
    torch.testing.assert_close(ctx, emb[ids].float())
    assert not ctx.requires_grad


def test_prompt_that_does_not_fit_is_an_error(tiny_backbone):
    long_name = " ".join(["dog"] * 70)
    with pytest.raises(PFedMoAPError, match="n_ctx"):
        PromptEncoder(tiny_backbone, [long_name, "cat"], 16)


def test_prompt_that_does_not_fit_is_an_error_for_any_class(tiny_backbone):
    long_name = " ".join(["dog"] * 70)
    with pytest.raises(PFedMoAPError, match="n_ctx"):
        PromptEncoder(tiny_backbone, ["cat", long_name], 16)
