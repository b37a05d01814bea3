"""PromptFL+FedPer: part of each client's prompt is personal and never leaves it (FedPer,
Arivazhagan et al. 2019, "Federated learning with personalization layers", applied to the CoOp
context vectors; the "PromptFL+FedPer" baseline of pFedMoAP's tables, Luo et al., ICLR 2025).

Split: of the prompt's n_ctx context vectors the first n_ctx - n_personal are shared and the last
`fedper.n_personal` (-1 = n_ctx // 2) are personal, as FedPer shares the base layers and keeps the
head.

A round: participants train their whole prompt (shared part as last downloaded, their own personal
part) and upload the shared rows only; the server FedAvgs them (sample-count weights) and sends the
new shared part to every client, which replaces its shared rows with it and keeps its personal
rows; every client is then evaluated with its own full prompt. Thus after every round all clients
hold the same shared part, and a client's personal part is what it last trained (the initial one
until it first trains). No download before training: the evaluation download of the previous round
already put the newest shared part in every client's prompt. Bytes: 4 * (n_ctx - n_personal) * W
down per client and round, the same plus 4 (the sample count) up per participant.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import PFedMoAPError
from ...exchange import Array, Broadcast
from ..base import Arrays, ClientPart, Method, ServerPart, fedavg


class Server(ServerPart):
    """Keeps the shared part's FedAvg and sends it to every client after each round."""

    def __init__(self, method):
        super().__init__(method)
        self.shared: np.ndarray | None = None

    def aggregate_fit(self, round_, participants, uploads):
        self.shared = fedavg(uploads["shared"], uploads["n_samples"][:, 0])

    def configure_evaluate(self, round_, evaluated):
        return {"global_shared": Broadcast(self.shared, np.ones(self.n_clients, bool))}

    def state_dict(self):
        return {"shared": np.zeros(0, np.float32) if self.shared is None else self.shared}

    def load_state_dict(self, state):
        s = state["shared"]
        self.shared = np.array(s, np.float32) if len(s) else None


class Client(ClientPart):
    """Trains its whole prompt, uploads the shared rows, adopts the downloaded shared rows."""

    def fit(self, state, data, round_, cid, down):
        self.train_prompt(state, data, round_, cid)
        k = self.method.n_shared
        return {"shared": self.upload_prompt(state.ctx[:k], round_, cid), "n_samples": [len(data.train_y)]}

    def evaluate(self, state, data, round_, cid, down):
        if "global_shared" in down:
            k, W = self.method.n_shared, self.ctx_shape[1]
            shared = torch.from_numpy(np.array(down["global_shared"], np.float32)).reshape(k, W)
            state.ctx = torch.cat([shared, state.ctx[k:]])
            self._text.pop(cid, None)
        return super().evaluate(state, data, round_, cid, down)


class FedPer(Method):
    """PromptFL sharing only the first n_ctx - n_personal context vectors (PromptFL+FedPer)."""
    Server, Client = Server, Client

    def __init__(self, setup):
        super().__init__(setup)
        n_ctx = setup.ctx_shape[0]
        p = self.options.n_personal
        self.n_personal = n_ctx // 2 if p == -1 else p
        if not 0 <= self.n_personal < n_ctx:
            raise PFedMoAPError(f"fedper.n_personal = {p}: expected 0 to {n_ctx - 1} (the prompt has "
                                f"{n_ctx} context vectors and at least one must be shared), or -1 for n_ctx // 2")
        self.n_shared = n_ctx - self.n_personal

    def arrays(self) -> Arrays:
        S = self.n_shared * self.setup.ctx_shape[1]
        return Arrays(up=(Array("shared", S), Array("n_samples", 1)),
                      eval_down=(Array("global_shared", S, broadcast=True),))
