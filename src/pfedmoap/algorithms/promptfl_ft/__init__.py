"""PromptFL+FT: PromptFL whose clients fine-tune the global prompt locally before evaluation (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import MAX_ROUNDS
from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class PromptFLFTOptions:
    epochs: int = 0               # local fine-tuning epochs before evaluation; 0 = train.local_epochs

    def validate(self):
        if not 0 <= self.epochs <= MAX_ROUNDS:
            raise PFedMoAPError(f"promptfl_ft.epochs = {self.epochs}: expected 0 to {MAX_ROUNDS} "
                                f"(0 = train.local_epochs)")


register(Manifest("promptfl_ft", "pfedmoap.algorithms.promptfl_ft.method:PromptFLFT", label="PromptFL+FT", order=40,
                  quickstart=True, section="promptfl_ft", options=PromptFLFTOptions,
                  summary="PromptFL, then each client fine-tunes the global prompt locally before evaluation"))
