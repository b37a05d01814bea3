"""Dense image features (pfedmoap.clip.dense) on random-init open_clip towers."""
import math
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import VisionTransformer

import pfedmoap
from pfedmoap.clip.dense import dense_image_features
from pfedmoap.ot import ot_logits

CONFIGS = Path(pfedmoap.__file__).resolve().parent / "model_configs"


def _model(name, seed=0):
    open_clip.add_model_config(CONFIGS)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.mark.parametrize("name", ["micro-clip", "tiny-clip"])
def test_vit_pooled_is_encode_image_and_patches_take_the_class_token_path(name):
    model = _model(name)
    visual = model.visual
    assert isinstance(visual, VisionTransformer)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    calls = []
    h = visual.transformer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        pooled, dense = dense_image_features(model, images)
    h.remove()
    assert len(calls) == 1                         # one pass of the tower gives both
    assert pooled.shape == (3, 128) and dense.shape == (3, (32 // 8) ** 2, 128)

    # open_clip's own forward: ln_post sees all tokens; token 0 becomes the pooled feature
    seen = {}
    h = visual.ln_post.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", o))
    with torch.no_grad():
        ref = model.encode_image(images)
    h.remove()
    torch.testing.assert_close(pooled, ref, rtol=1e-6, atol=1e-6)
    tokens = seen["tokens"] @ visual.proj          # (B, 1 + M, D)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tokens[:, 1:], dense, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dense[:, 0], dense[:, 1])


@pytest.mark.parametrize("pool_type,final_ln_after_pool", [("tok", True), ("avg", False), ("avg", True)])
def test_vit_other_pooling_configs_keep_pooled_equal_to_forward(pool_type, final_ln_after_pool):
    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                               output_dim=48, pool_type=pool_type, final_ln_after_pool=final_ln_after_pool).eval()
    with torch.no_grad():
        visual.ln_post.weight.uniform_(0.5, 1.5)   # make ln_post's placement matter
        visual.ln_post.bias.normal_()
        images = torch.randn(2, 3, 32, 32)
        pooled, dense = dense_image_features(visual, images)
        torch.testing.assert_close(pooled, visual(images), rtol=1e-6, atol=1e-6)
    assert dense.shape == (2, 16, 48)


def _rn50():
    model = _model("RN50")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model.visual.modules():         # random init zeroes bn3; make every block count
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return model


def _hand_attention(pool, tokens, self_only):
    """Multi-head attention of the attention pool written out: tokens (L, B, C) -> (L, B, D)."""
    L, B, C = tokens.shape
    h = pool.num_heads
    q, k, v = (lin(tokens).reshape(L, B, h, C // h).permute(1, 2, 0, 3)
               for lin in (pool.q_proj, pool.k_proj, pool.v_proj))     # (B, h, L, C/h)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // h)
    if self_only:
        scores = scores.masked_fill(~torch.eye(L, dtype=torch.bool), float("-inf"))
    out = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(L, B, C)
    return pool.c_proj(out)


def _check_resnet(model, visual, images):
    """pooled = CLIP's pool output; dense = every position's output of that attention
    ("attention") or of self-only attention ("value"), both checked with a hand-written pool."""
    last = {}
    h = visual.layer4.register_forward_hook(lambda m, i, o: last.setdefault("x", o))
    with torch.no_grad():
        pooled, dense = dense_image_features(model, images)                     # default: attention
        _, dense_v = dense_image_features(model, images, resnet_mode="value")
        ref = model.encode_image(images) if hasattr(model, "encode_image") else model(images)
    h.remove()
    B, M = images.shape[0], (images.shape[-1] // 32) ** 2
    D = visual.attnpool.c_proj.out_features
    assert pooled.shape == (B, D) and dense.shape == (B, M, D) and dense_v.shape == (B, M, D)
    torch.testing.assert_close(pooled, ref, rtol=1e-5, atol=1e-5)

    pool = visual.attnpool
    with torch.no_grad():
        x = last["x"].flatten(2).permute(2, 0, 1)
        tokens = torch.cat([x.mean(0, keepdim=True), x]) + pool.positional_embedding[:, None]
        full = _hand_attention(pool, tokens, self_only=False)
        own = _hand_attention(pool, tokens, self_only=True)
    torch.testing.assert_close(full[0], ref, rtol=1e-4, atol=1e-4)      # the hand version is CLIP's pool
    torch.testing.assert_close(dense, full[1:].permute(1, 0, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense_v, own[1:].permute(1, 0, 2), rtol=1e-4, atol=1e-4)
    assert (dense - dense_v).abs().max() > 1e-2 * dense.abs().max()     # the two modes differ


def test_rn50_pooled_is_encode_image_and_positions_follow_the_attention_pool():
    model = _rn50()
    _check_resnet(model, model.visual, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)))


def test_small_resnet_tower_and_errors():
    from open_clip.modified_resnet import ModifiedResNet
    torch.manual_seed(0)
    visual = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=24, heads=2, image_size=64, width=16).eval()
    images = torch.randn(2, 3, 64, 64)
    _check_resnet(visual, visual, images)
    with pytest.raises(ValueError):
        dense_image_features(visual, images, resnet_mode="mean")
    with pytest.raises(ValueError):
        dense_image_features(torch.nn.Linear(3, 3), images)


def test_dense_features_feed_ot_logits():
    model = _model("micro-clip")
    tok = open_clip.get_tokenizer("micro-clip")
    with torch.no_grad():
        _, dense = dense_image_features(model, torch.randn(2, 3, 32, 32))
        texts = model.encode_text(tok([f"a photo of a {c}" for c in "abc"] + [f"{c}" for c in "abc"]))
    logits = ot_logits(dense, texts.view(2, 3, -1), model.logit_scale.exp())
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
