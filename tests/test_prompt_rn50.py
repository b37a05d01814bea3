"""The prompt encoder's exact fast paths (EOS truncation, shared prefix) on CLIP RN50's text tower.

The paper's few-shot and CIFAR runs use RN50 with OpenAI's weights, i.e. `RN50-quickgelu`: a
12-layer, width-512, 8-head causal text transformer with QuickGELU. Random init is enough here:
exactness is a property of the architecture, not of the weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfedmoap.clip.prompt import PromptEncoder, init_context

NAMES = ["cat", "water lily", "great_white shark", "x", "bird of paradise flower", "Abyssinian"]


@pytest.fixture(scope="module")
def rn50():
    from pfedmoap.clip.backbone import Backbone
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Backbone("RN50-quickgelu", pretrained="", seed=0)
    torch.set_num_threads(n)


def test_rn50_text_tower_is_openais(rn50):
    from open_clip.model import ModifiedResNet
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock
    m = rn50.model
    assert isinstance(m.visual, ModifiedResNet)
    blocks = m.transformer.resblocks
    assert len(blocks) == 12 and m.token_embedding.weight.shape == (49408, 512)
    assert all(type(b) is ResidualAttentionBlock and type(b.mlp.gelu) is QuickGELU for b in blocks)
    assert blocks[0].attn.num_heads == 8 and rn50.embed_dim == 1024


def _reference(backbone, names, template="a photo of a {}."):
    with torch.no_grad():
        tokens = backbone.tokenizer([template.format(n.replace("_", " ")) for n in names])
        return F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_phrase_context_reproduces_encode_text(rn50, truncate, shared_prefix):
    ctx = init_context(rn50, 16, "a photo of a", torch.Generator().manual_seed(0))
    enc = PromptEncoder(rn50, NAMES, ctx.shape[0], truncate=truncate, shared_prefix=shared_prefix)
    assert enc.shared_prefix == shared_prefix and (enc.length < 77) == truncate
    feats = enc(ctx)
    ref = _reference(rn50, NAMES)
    assert feats.shape == (len(NAMES), 1024)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=0)
    assert (feats[0] - feats[1]).abs().max() > 1e-3            # not vacuous: classes differ


def test_fast_paths_equal_plain_path_with_gradients(rn50):
    g = torch.Generator().manual_seed(5)
    ctx0 = init_context(rn50, 16, "", g)
    weights = torch.randn(len(NAMES), rn50.embed_dim, generator=g)
    out = {}
    for truncate in (False, True):
        for shared in (False, True):
            enc = PromptEncoder(rn50, NAMES, 16, truncate=truncate, shared_prefix=shared)
            ctx = ctx0.clone().requires_grad_(True)
            feats = enc(ctx)
            (feats * weights).sum().backward()
            out[truncate, shared] = feats.detach(), ctx.grad.detach()
    f_plain, g_plain = out[False, False]
    assert g_plain.abs().max() > 0 and (f_plain[0] - f_plain[2]).abs().max() > 1e-3
    for key in ((True, False), (False, True), (True, True)):
        f, grad = out[key]
        torch.testing.assert_close(f, f_plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, g_plain, atol=1e-5, rtol=1e-4)
    # another context gives other features: ctx really is spliced into RN50's text path
    other = PromptEncoder(rn50, NAMES, 16)(ctx0 + 0.5 * torch.randn(ctx0.shape, generator=g))
    assert (other - f_plain).abs().max() > 1e-3
