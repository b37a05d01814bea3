"""pFedMoAP (Luo et al., ICLR 2025): the local prompt plus frozen non-local experts, mixed by a
client-side gating network (method.py). Its options are the [moe] section."""
from __future__ import annotations

from dataclasses import dataclass

from ... import router
from ...errors import PFedMoAPError
from .. import register
from ..manifest import Figure, Manifest


@dataclass
class MoEOptions:
    n_experts: int = 10           # K, counting the local prompt
    router: str = "knn"           # see router.ROUTERS
    lam: float = 0.5              # logits = lam * local + moe
    gating_dim: int = 128
    gating_heads: int = 8
    scaling: float = 10.0
    gating_lr: float = 0.01
    gate: str = "attention"       # attention (the paper's) | linear (ablation)
    aggregate_gate: bool = False  # ablation: FedAvg the gating networks like the prompt
    gating_init: str = "shared"   # shared: one init for every client (the reference) | per_client
    participation: str = "paper"  # paper | snapshot (see method.py's docstring)

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise PFedMoAPError(msg)
        need(self.n_experts >= 1, f"moe.n_experts = {self.n_experts}: expected K >= 1 (the local prompt counts)")
        need(self.router in router.names(), f"moe.router = {self.router!r}: expected one of {', '.join(router.names())}")
        need(self.gating_dim >= 1, f"moe.gating_dim = {self.gating_dim}: expected >= 1")
        need(self.gating_heads >= 1 and self.gating_dim % self.gating_heads == 0,
             f"moe.gating_heads = {self.gating_heads}: expected a divisor of moe.gating_dim = {self.gating_dim}")
        need(self.scaling > 0, f"moe.scaling = {self.scaling}: expected > 0")
        need(self.lam >= 0, f"moe.lam = {self.lam}: expected >= 0 (logits = lam * local + moe)")
        need(self.gating_lr > 0, f"moe.gating_lr = {self.gating_lr}: expected > 0")
        for key, value, allowed in (("gate", self.gate, ("attention", "linear")),
                                    ("gating_init", self.gating_init, ("shared", "per_client")),
                                    ("participation", self.participation, ("paper", "snapshot"))):
            need(value in allowed, f"moe.{key} = {value!r}: expected one of {', '.join(allowed)}")


FIGURES = (Figure("experts", "how many rounds client j was one of client i's experts (N x N)",
                  "pfedmoap.algorithms.pfedmoap.figures:expert_figure"),
           Figure("gating", "mean gating weight of the local prompt and of each expert rank per round",
                  "pfedmoap.algorithms.pfedmoap.figures:gating_figure"))

register(Manifest("pfedmoap", "pfedmoap.algorithms.pfedmoap.method:PFedMoAP", label="pFedMoAP", order=90,
                  quickstart=True, section="moe", options=MoEOptions, default=True, figures=FIGURES,
                  summary="the local prompt plus K-1 non-local experts from the pool, mixed by a client-side "
                          "gating network"))
