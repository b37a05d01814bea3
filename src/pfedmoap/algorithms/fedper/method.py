"""PromptFL+FedPer: part of each client's prompt is personal and never leaves it (FedPer,
Arivazhagan et al. 2019, "Federated learning with personalization layers", applied to the CoOp
context vectors; the "PromptFL+FedPer" baseline of pFedMoAP's tables, Luo et al., ICLR 2025).

Split: of the prompt's n_ctx context vectors the first n_ctx - n_personal are shared and the last
`fedper.n_personal` (-1 = n_ctx // 2) are personal, as FedPer shares the base layers and keeps the
head.

A round: each participant receives the current shared part (from round 2 on), puts it in its
prompt's shared rows and trains its whole prompt (shared part as downloaded, its own personal part),
then uploads the shared rows only; the server FedAvgs them (sample-count weights) and sends the new
shared part to every client evaluated, which is evaluated with it and its own personal rows. Thus a
client trains from the newest shared part and a client's personal part is what it last trained (the
initial one until it first trains). Evaluation changes no client state: the shared part reaches a
client's state only through the download before training (a client not evaluated in a round trains
next exactly as one that was; issue 21). Bytes: 4 * (n_ctx - n_personal) * W down per participant
(before training) and per evaluated client (before evaluation), the same plus 4 (the sample count)
up per participant, as PromptFL's global prompt.
"""
from __future__ import annotations


import numpy as np
import torch

from ...errors import PFedMoAPError
from ...exchange import Array, Broadcast
from ..base import Arrays, ClientPart, Method, ServerPart, fedavg, sample_count_array, sample_counts


class Server(ServerPart):
    """Keeps the shared part's FedAvg; sends it to the participants before training and to the
    evaluated clients before evaluation."""

    def __init__(self, method):
        super().__init__(method)
        self.shared: np.ndarray | None = None

    def configure_fit(self, round_, participants):
        if self.shared is None:
            return {}
        to = np.zeros(self.n_clients, bool)
        to[participants] = True
        return {"global_shared": Broadcast(self.shared, to)}

    def aggregate_fit(self, round_, participants, uploads):
        self.shared = fedavg(uploads["shared"], sample_counts(uploads))

    def configure_evaluate(self, round_, evaluated):
        # nothing arrived yet (train.drop_rate): the shared rows of the initial prompt
        shared = self.initial_prompt()[:self.method.n_shared * self.method.setup.ctx_shape[1]] \
            if self.shared is None else self.shared
        return {"global_shared": Broadcast(shared, np.ones(self.n_clients, bool))}

    def state_dict(self):
        return {"shared": np.zeros(0, np.float32) if self.shared is None else self.shared}

    def load_state_dict(self, state):
        s = state["shared"]
        self.shared = np.array(s, np.float32) if len(s) else None


class Client(ClientPart):
    """Adopts the downloaded shared rows, trains its whole prompt, uploads the shared rows; is
    evaluated with the newest shared rows and its personal ones (its state untouched)."""

    def with_shared(self, ctx: torch.Tensor, row) -> torch.Tensor:
        """`ctx` with its shared (first n_shared) rows replaced by the downloaded `row`."""
        k, W = self.method.n_shared, self.ctx_shape[1]
        return torch.cat([torch.from_numpy(np.array(row, np.float32)).reshape(k, W), ctx[k:]])

    def released_rows(self):
        return slice(0, self.method.n_shared)

    def fit(self, state, data, round_, cid, down):
        if "global_shared" in down:
            state.ctx = self.with_shared(state.ctx, down["global_shared"])
        self.train_prompt(state, data, round_, cid)
        k = self.method.n_shared
        return {"shared": self.upload_prompt(state.ctx[:k], round_, cid), **self.upload_count(data)}

    def evaluate(self, state, data, round_, cid, down):
        with torch.no_grad():
            text = self.encoder(self.with_shared(state.ctx, down["global_shared"]))
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


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
        shared = Array("global_shared", S, broadcast=True)
        return Arrays(fit_down=(shared,), up=(Array("shared", S), *sample_count_array(self.cfg)), eval_down=(shared,))
