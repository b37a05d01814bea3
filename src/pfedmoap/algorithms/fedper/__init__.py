"""PromptFL+FedPer: part of each client's prompt is personal and never leaves it (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class FedPerOptions:
    n_personal: int = -1          # personal (never aggregated) context vectors, the last ones; -1 = n_ctx // 2

    def validate(self):
        if self.n_personal < -1:
            raise PFedMoAPError(f"fedper.n_personal = {self.n_personal}: expected >= 0, or -1 for n_ctx // 2")


register(Manifest("fedper", "pfedmoap.algorithms.fedper.method:FedPer", label="PromptFL+FedPer", order=60,
                  quickstart=True, section="fedper", options=FedPerOptions,
                  summary="PromptFL sharing the first n_ctx - n_personal context vectors; the rest stay personal"))
