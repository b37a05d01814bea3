"""pFedPrompt: a global (FedAvg) text prompt and a personalized visual attention over each client's
memory of its own image features (method.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PFedMoAPError
from .. import register
from ..manifest import Manifest


@dataclass
class PFedPromptOptions:
    # No code of pFedPrompt's authors is public; these are this package's choices, in the range of
    # the key-value cache of Tip-Adapter (Zhang et al., ECCV 2022) whose form the attention takes here.
    alpha: float = 1.0            # weight of the personalized visual logits added to the prompt's
    beta: float = 5.5             # sharpness of the attention over the memory: exp(-beta (1 - cos))

    def validate(self):
        if not self.alpha >= 0:
            raise PFedMoAPError(f"pfedprompt.alpha = {self.alpha}: expected >= 0")
        if not self.beta > 0:
            raise PFedMoAPError(f"pfedprompt.beta = {self.beta}: expected > 0")


register(Manifest("pfedprompt", "pfedmoap.algorithms.pfedprompt.method:PFedPrompt", label="pFedPrompt", order=75,
                  quickstart=True, section="pfedprompt", options=PFedPromptOptions,
                  summary="a global (FedAvg) text prompt plus a personalized visual attention over the "
                          "client's own image features"))
