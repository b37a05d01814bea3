"""Dense (per-patch / per-position) image features in CLIP's joint space, for FedOTP-style OT.

One forward pass of an open_clip visual tower returns both the pooled feature (equal to
``model.encode_image``) and M dense features (B, M, D):

* VisionTransformer: the patch tokens after the transformer, through the final LayerNorm
  ``ln_post`` and ``proj`` -- the path the class token takes to become the pooled feature (the
  reference's ``ModifiedVisionTransformer`` in HongxiaLee/FedOTP ``clip/model.py`` does this to
  all tokens and uses token 0 as the pooled, tokens 1.. as the dense features).
* ModifiedResNet (RN50, ...): the attention pool's tokens are [mean of the positions; each
  position of the last stage] + positional embedding. Two readings of "per-position feature":
  - ``resnet_mode="attention"`` (default, what the FedOTP reference does: its
    ``ModifiedResNet_GLP_OT`` returns the whole ``attnpool`` output and takes ``[1:]``): every
    position token is a query of the same multi-head attention whose token-0 output is the
    pooled feature, i.e. each position attends to all tokens.
  - ``resnet_mode="value"`` (MaskCLIP-style): ``c_proj(v_proj(token))``, what the attention pool
    would output at a position that attends only to itself.
  The pooled feature is token 0 of the full attention in both modes.

Unsupported towers (timm trunks, ViTs with an attentional pooler) raise ValueError. Runs under
the caller's grad / autocast mode; the tower should be in eval mode (patch dropout, BatchNorm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense_image_features", "vit_dense_features", "resnet_dense_features"]

RESNET_MODES = ("attention", "value")


def _visual(model_or_visual):
    return getattr(model_or_visual, "visual", model_or_visual)


def vit_dense_features(visual, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip VisionTransformer: (pooled (B, D), patch features (B, M, D)), M = grid cells."""
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("dense features: ViTs with an attentional pooler are not supported")
    x = visual._embeds(images)                         # class token + patches, ln_pre applied
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)                        # exactly what visual.forward pools
    patches = visual.ln_post(x[:, 1:])                 # LayerNorm is per token
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        patches = patches @ visual.proj
    return pooled, patches


def resnet_dense_features(visual, images: torch.Tensor, mode: str = "attention"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip ModifiedResNet: (pooled (B, D), position features (B, H*W, D)); see module doc."""
    if mode not in RESNET_MODES:
        raise ValueError(f"resnet mode {mode!r}: expected one of {RESNET_MODES}")
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    x = x.flatten(2).permute(2, 0, 1)                                  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)             # (HW+1, B, C)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(                           # as AttentionPool2d.forward
        query=x, key=x, value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=pool.training,
        need_weights=False,
    )
    pooled = out[0]
    if mode == "attention":
        dense = out[1:]
    else:
        dense = pool.c_proj(pool.v_proj(x[1:]))
    return pooled, dense.permute(1, 0, 2)


def dense_image_features(model_or_visual, images: torch.Tensor, resnet_mode: str = "attention"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), dense (B, M, D)) from one pass of an open_clip CLIP model's visual tower
    (or the tower itself); pooled equals ``model.encode_image(images)``. Not normalised."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer
    visual = _visual(model_or_visual)
    if isinstance(visual, VisionTransformer):
        return vit_dense_features(visual, images)
    if isinstance(visual, ModifiedResNet):
        return resnet_dense_features(visual, images, resnet_mode)
    raise ValueError(f"dense features: unsupported visual tower {type(visual).__name__} "
                     f"(open_clip VisionTransformer or ModifiedResNet expected)")
