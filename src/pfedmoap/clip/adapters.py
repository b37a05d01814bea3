"""Running open_clip's towers with a per-layer hook on the residual blocks' outputs.

A method that trains inside a tower (pFedMMA's multi-modal adapters) gives a `hook(i, block, x_in, x_out)`
called after residual block i (0-based) with the block, its input and its output (tokens in the
transformer's own layout; the adapters act per token, so the layout does not matter); what it
returns is the next block's input. Without a hook the towers run exactly as open_clip runs them.

* `run_blocks`: open_clip's `Transformer.forward` block by block, with the hook.
* `encode_image`: `VisionTransformer.forward` with the hook (pooled feature, L2-normalised);
  differentiable, under the caller's grad mode.
* The text tower: `PromptEncoder.__call__(ctx, hook=...)` (clip/prompt.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PFedMoAPError


def check_vit(backbone, what: str) -> None:
    """Refuse, in one line, an image tower without residual attention blocks (open_clip ViT only)."""
    from open_clip.transformer import VisionTransformer
    visual = backbone.model.visual
    if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
        raise PFedMoAPError(f"model.name = {backbone.name!r}: {what} needs an open_clip ViT image tower "
                            f"(residual attention blocks to adapt); {type(visual).__name__} has none")


def run_blocks(transformer, x: torch.Tensor, hook=None, attn_mask=None) -> torch.Tensor:
    """open_clip `Transformer.forward` on (N, L, W) tokens, calling `hook` after every block."""
    if hook is None:
        return transformer(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()      # NLD -> LND, as open_clip
    for i, block in enumerate(transformer.resblocks):
        x = hook(i, block, x, block(x, attn_mask=attn_mask))
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


def encode_image(backbone, images: torch.Tensor, hook=None) -> torch.Tensor:
    """Preprocessed images (B, 3, H, W) -> L2-normalised float32 image features (B, D) through the
    image tower with `hook` on its blocks (no hook: equal to `Backbone.encode_images`)."""
    visual = backbone.model.visual
    with backbone.autocast():
        x = visual._embeds(images.to(backbone.device))
        x = run_blocks(visual.transformer, x, hook)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
    return F.normalize(pooled.float(), dim=-1)


def depth(transformer) -> int:
    return len(transformer.resblocks)
