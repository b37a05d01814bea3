"""`zeroshot`: the frozen CLIP with the hand prompt ("a photo of a {}."); nothing trains or moves."""
from __future__ import annotations

import numpy as np
import torch

from ..base import ClientPart, Method, PromptState, ServerPart


class Server(ServerPart):
    def participants(self, round_: int) -> np.ndarray:
        return np.zeros(0, np.int64)


class Client(ClientPart):
    def init_state(self, cid: int) -> PromptState:
        return PromptState(ctx=torch.zeros(0))

    def own_text(self, state, cid: int) -> torch.Tensor:
        if "hand" not in self._text:     # the same for every client: encoded once per rank
            names = self.encoder.classnames
            self._text["hand"] = self.backbone.encode_texts([self.cfg.prompt.template.format(c) for c in names])
        return self._text["hand"]

    def evaluate_global(self, state, data, round_, cid, down):
        """The hand prompt is every client's model and the global one."""
        return self.evaluate(state, data, round_, cid, down)


class ZeroShot(Method):
    Server, Client = Server, Client
