"""CoOp-based baselines: `local` (no communication), `promptfl` (FedAvg of ctx), `fedprox`."""
from __future__ import annotations

import torch

from . import register
from .base import Algorithm, ClientState


@register
class Local(Algorithm):
    """CoOp on each client alone: nothing is sent, the prompt never leaves."""
    name = "local"
    shares_prompt = False

    def start_round(self, state: ClientState, global_prompt: torch.Tensor | None) -> None:
        pass


@register
class PromptFL(Algorithm):
    """FedAvg of the context vectors; every client is evaluated with the global prompt."""
    name = "promptfl"
    eval_with_global = True


@register
class FedProx(PromptFL):
    """PromptFL plus the proximal term mu/2 * ||ctx - ctx_global||^2."""
    name = "fedprox"

    def penalty(self, ctx: torch.Tensor, global_prompt: torch.Tensor | None):
        if global_prompt is None:
            return 0.0
        return 0.5 * self.cfg.fedprox.mu * (ctx - global_prompt).pow(2).sum()
