"""pFedMoAP: the local prompt plus frozen non-local experts, mixed by a client-side gating network."""
from __future__ import annotations

import torch

from .. import rng
from ..clip.gating import GatingNetwork, moe_logits
from . import register
from .base import Algorithm, ClientState


@register
class PFedMoAP(Algorithm):
    name = "pfedmoap"
    uses_experts = True

    def init_client(self, cid: int) -> ClientState:
        state = super().init_client(cid)
        m = self.cfg.moe
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.key(self.cfg.seed, "gating-init", 0, cid))
            state.gating = GatingNetwork(self.backbone.embed_dim, m.gating_dim, m.gating_heads,
                                         m.scaling).to(self.backbone.device)
        t = self.cfg.train
        # The gating optimiser belongs to the client and persists across rounds.
        state.gating_opt = torch.optim.SGD(state.gating.parameters(), lr=m.gating_lr,
                                           momentum=t.momentum, weight_decay=t.weight_decay)
        for p in state.gating.parameters():
            # A zero buffer is what SGD's first step (dampening 0) would create: explicit, so the
            # state has a fixed shape for checkpoints.
            state.gating_opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return state

    def logits(self, state: ClientState, x: torch.Tensor, text: torch.Tensor):
        return moe_logits(state.gating, x, text, self.logit_scale, self.cfg.moe.lam)
