"""CoOp-based baselines: `local` (no communication), `promptfl` (FedAvg of the prompt), `fedprox`
(PromptFL plus a proximal term). Implemented in method.py."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class FedProxOptions:
    mu: float = 0.5               # weight of the proximal term mu/2 * ||ctx - ctx_global||^2

    def validate(self):
        if self.mu < 0:
            raise PFedMoAPError(f"fedprox.mu = {self.mu}: expected >= 0")


_IMPL = "pfedmoap.algorithms.coop.method"
register(Manifest("local", f"{_IMPL}:Local", label="CoOp", order=20, quickstart=True,
                  summary="CoOp on each client alone: nothing is sent"))
register(Manifest("promptfl", f"{_IMPL}:PromptFL", label="PromptFL", order=30, quickstart=True,
                  summary="FedAvg of the prompt; every client evaluated with the global prompt"))
register(Manifest("fedprox", f"{_IMPL}:FedProx", label="PromptFL+FedProx", order=50, quickstart=True,
                  section="fedprox", options=FedProxOptions,
                  summary="PromptFL plus the proximal term mu/2 ||ctx - ctx_global||^2"))
