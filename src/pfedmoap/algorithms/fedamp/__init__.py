"""PromptFL+FedAMP: attentive message passing between the clients' prompts (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class FedAMPOptions:
    sigma: float = 25.0           # attention scale: xi_ij ~ exp(sigma * cos(w_i, w_j))
    self_weight: float = 0.5      # xi_ii, the client's own share of u_i
    lam: float = 1.0              # weight of the proximal term lam/2 * ||ctx - u_i||^2

    def validate(self):
        if not self.sigma > 0:
            raise PFedMoAPError(f"fedamp.sigma = {self.sigma}: expected > 0")
        if not 0 <= self.self_weight <= 1:
            raise PFedMoAPError(f"fedamp.self_weight = {self.self_weight}: expected 0 <= self_weight <= 1")
        if not self.lam >= 0:
            raise PFedMoAPError(f"fedamp.lam = {self.lam}: expected >= 0")


register(Manifest("fedamp", "pfedmoap.algorithms.fedamp.method:FedAMP", label="PromptFL+FedAMP", order=70,
                  quickstart=True, section="fedamp", options=FedAMPOptions,
                  summary="a personalised attention-weighted prompt per participant plus a proximal term"))
