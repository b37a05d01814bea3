"""`zeroshot`: the frozen CLIP with the hand prompt ("a photo of a {}."); nothing trains."""
from __future__ import annotations

import torch

from . import register
from .base import Algorithm, ClientState


@register
class ZeroShot(Algorithm):
    name = "zeroshot"
    trains = False
    shares_prompt = False

    def __init__(self, cfg, encoder, backbone):
        super().__init__(cfg, encoder, backbone)
        self._text = None

    def init_client(self, cid: int) -> ClientState:
        return ClientState(ctx=torch.zeros(0))

    def text_features(self, state: ClientState, global_prompt) -> torch.Tensor:
        if self._text is None:   # the same for every client: encoded once per rank
            names = self.encoder.classnames
            self._text = self.backbone.encode_texts([self.cfg.prompt.template.format(c) for c in names])
        return self._text
