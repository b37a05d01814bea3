"""The client-side gating network of pFedMoAP (docs/methods.md; the paper §3). It never leaves its client.

One multi-head attention block on d-dimensional pooled features: the query is the image feature,
the keys and values are, per class, the K text features of the local prompt and the experts.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PFedMoAPError


class _Gate(nn.Module):
    def __init__(self, embed_dim: int, dim: int):
        super().__init__()
        if dim > embed_dim or embed_dim % dim:
            raise PFedMoAPError(f"moe.gating_dim = {dim}: expected a divisor of the CLIP embedding dim {embed_dim}")
        self.stride, self.dim = embed_dim // dim, dim

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Every r-th coordinate (strided sub-sampling, as the reference code does)."""
        return x[..., ::self.stride]


class GatingNetwork(_Gate):
    def __init__(self, embed_dim: int, dim: int = 128, heads: int = 8, scaling: float = 10.0):
        super().__init__(embed_dim, dim)
        self.heads, self.scaling = heads, scaling
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor):
        """image_feats (B, D); text_feats (K, C, D), local first.

        Returns T_MoE (B, C, d) and the gating weights (B, C, K), averaged over heads."""
        B, (K, C, _) = image_feats.shape[0], text_feats.shape
        h, dh = self.heads, self.dim // self.heads
        q = self.w_q(self.pool(image_feats)).view(B, h, dh)
        kv = self.pool(text_feats)
        k = self.w_k(kv).view(K, C, h, dh)
        v = self.w_v(kv).view(K, C, h, dh)
        scores = torch.einsum("bhe,kche->bchk", q, k) * self.scaling
        weights = scores.softmax(dim=-1)                                  # over the K experts
        mixed = torch.einsum("bchk,kche->bche", weights, v).reshape(B, C, self.dim)
        return self.w_o(mixed), weights.mean(dim=2)


class LinearGate(_Gate):
    """The ablation's linear gate (`moe.gate = "linear"`): one linear map of the pooled image feature
    to K scores, softmax over the experts available, and T_MoE = the weighted sum of the experts'
    pooled text features. Class-independent weights, no value or output projection."""

    def __init__(self, embed_dim: int, dim: int, n_experts: int):
        super().__init__(embed_dim, dim)
        self.score = nn.Linear(dim, n_experts)

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor):
        K, C = text_feats.shape[:2]
        weights = (self.score(self.pool(image_feats))[:, :K]).softmax(dim=-1)          # (B, K)
        mixed = torch.einsum("bk,kcd->bcd", weights, self.pool(text_feats))
        return mixed, weights[:, None, :].expand(-1, C, -1)


def moe_logits(gating: GatingNetwork, image_feats: torch.Tensor, text_feats: torch.Tensor,
               logit_scale: float, lam: float):
    """Final logits `lam * local + moe`; with no non-local experts (K = 1) exactly the local logits.

    Returns (logits (B, C), gating weights (B, C, K) or None)."""
    local = logit_scale * image_feats @ text_feats[0].t()
    if text_feats.shape[0] == 1:
        return local, None
    t_moe, weights = gating(image_feats, text_feats)
    moe = logit_scale * torch.einsum("bd,bcd->bc", gating.pool(image_feats), t_moe)
    return lam * local + moe, weights


def moe_logits_block(params: dict[str, torch.Tensor], gate: GatingNetwork, image_feats: torch.Tensor,
                     text_feats: torch.Tensor, n_valid: list[int], logit_scale: float, lam: float) -> torch.Tensor:
    """`moe_logits` for a block of B clients, each with its own attention gating network, in one
    batched computation: params[name] (B, *shape) the clients' stacked parameters of `gate`'s
    layout; image_feats (B, bs, D); text_feats (B, K_max, C, D), client b's first n_valid[b]
    entries real (local first), the rest padding, masked out of the softmax. A client with one
    entry gets its local logits, as moe_logits gives. Returns logits (B, bs, C)."""
    B, bs, _ = image_feats.shape
    K, C = text_feats.shape[1:3]
    h, d = gate.heads, gate.dim
    local = logit_scale * torch.bmm(image_feats, text_feats[:, 0].transpose(1, 2))

    def linear(name: str, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(B, -1, d)
        return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), flat,
                             params[f"{name}.weight"].transpose(1, 2)).view(z.shape)

    px, pt = gate.pool(image_feats), gate.pool(text_feats)
    q = linear("w_q", px).view(B, bs, h, d // h)
    k = linear("w_k", pt).view(B, K, C, h, d // h)
    v = linear("w_v", pt).view(B, K, C, h, d // h)
    scores = torch.einsum("nbhe,nkche->nbchk", q, k) * gate.scaling
    valid = torch.arange(K, device=scores.device)[None, :] < torch.tensor(n_valid, device=scores.device)[:, None]
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    mixed = torch.einsum("nbchk,nkche->nbche", weights, v).reshape(B, bs, C, d)
    moe = logit_scale * torch.einsum("nbd,nbcd->nbc", px, linear("w_o", mixed))
    has = torch.tensor([n > 1 for n in n_valid], device=local.device)[:, None, None]
    return torch.where(has, lam * local + moe, local)
