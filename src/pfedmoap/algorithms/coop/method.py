"""CoOp-based baselines: `local` (no communication), `promptfl` (FedAvg of the prompt), `fedprox`."""
from __future__ import annotations


import numpy as np
import torch

from ...exchange import Array, Broadcast
from ..base import Arrays, ClientPart, Method, ServerPart, fedavg, sample_count_array, sample_counts


class LocalClient(ClientPart):
    """CoOp's client; a block of clients trains and is evaluated batched (ClientPart's defaults)."""
    block_training = True


class Local(Method):
    """CoOp on each client alone: nothing is sent, the prompt never leaves (CoOp, Zhou et al. 2022)."""
    Client = LocalClient


class PromptFLServer(ServerPart):
    """Keeps the global prompt: sends it to the participants, FedAvgs their uploads, and sends the
    result to every client for evaluation."""

    def __init__(self, method):
        super().__init__(method)
        self.global_prompt: np.ndarray | None = None

    def configure_fit(self, round_, participants):
        if self.global_prompt is None:
            return {}
        return {"global_prompt": Broadcast(self.global_prompt, _mask(self.n_clients, participants))}

    def aggregate_fit(self, round_, participants, uploads):
        self.global_prompt = fedavg(uploads["prompt"], sample_counts(uploads))

    def configure_evaluate(self, round_, evaluated):
        g = self.initial_prompt() if self.global_prompt is None else self.global_prompt   # None: nothing arrived yet
        return {"global_prompt": Broadcast(g, np.ones(self.n_clients, bool))}

    def state_dict(self):
        return {"global_prompt": np.zeros(0, np.float32) if self.global_prompt is None else self.global_prompt}

    def load_state_dict(self, state):
        g = state["global_prompt"]
        self.global_prompt = np.array(g, np.float32) if len(g) else None


class PromptFLClient(ClientPart):
    """Starts from the global prompt, trains, uploads its prompt; evaluated with the new global one."""

    def __init__(self, method):
        super().__init__(method)
        self._global_text: tuple[int, torch.Tensor] | None = None

    def fit(self, state, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        self.train_prompt(state, data, round_, cid, penalty=self.penalty(down))
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), **self.upload_count(data)}

    block_training = True

    def fit_block(self, states, datas, round_, cids, downs):
        if len(cids) == 1:
            return super().fit_block(states, datas, round_, cids, downs)
        for s, dn in zip(states, downs):
            if "global_prompt" in dn:
                s.ctx = self.prompt(dn["global_prompt"])
        self.train_prompt_block(states, datas, round_, cids, penalty=self.penalty_block(downs))
        return [{"prompt": self.upload_prompt(s.ctx, round_, c), **self.upload_count(d)}
                for s, d, c in zip(states, datas, cids)]

    def evaluate_block(self, states, datas, round_, cids, downs):
        # the global prompt's text is encoded once per rank and round already
        return [self.evaluate(s, d, round_, c, dn) for s, d, c, dn in zip(states, datas, cids, downs)]

    def penalty(self, down):
        return None

    def penalty_block(self, downs):
        """`penalty` for a block: ctx (B, n_ctx, W) -> (B,), or None."""
        return None

    def evaluate(self, state, data, round_, cid, down):
        return self.with_global_prompt(data, round_, down)

    def evaluate_global(self, state, data, round_, cid, down):
        """The global model: the global prompt sent for evaluation (the round's FedAvg)."""
        return self.with_global_prompt(data, round_, down)

    def with_global_prompt(self, data, round_, down):
        if self._global_text is None or self._global_text[0] != round_:     # once per rank and round
            with torch.no_grad():
                self._global_text = (round_, self.encoder(self.prompt(down["global_prompt"])))
        text = self._global_text[1]
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


def prompt_exchange(P: int, evaluate_global: bool, cfg=None) -> Arrays:
    """The arrays of a prompt-averaging method: the global prompt down, prompt + sample count
    (not under DP: pass the run's cfg) up."""
    g = Array("global_prompt", P, broadcast=True)
    counts = (Array("n_samples", 1),) if cfg is None else sample_count_array(cfg)
    return Arrays(fit_down=(g,), up=(Array("prompt", P), *counts),
                  eval_down=(g,) if evaluate_global else ())


def _mask(n: int, ids: np.ndarray) -> np.ndarray:
    m = np.zeros(n, bool)
    m[ids] = True
    return m


class PromptFL(Method):
    """FedAvg of the context vectors (PromptFL, Guo et al. 2023)."""
    Server, Client = PromptFLServer, PromptFLClient

    def arrays(self) -> Arrays:
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True, cfg=self.cfg)


class FedProxClient(PromptFLClient):
    def penalty(self, down):
        if "global_prompt" not in down:
            return None
        anchor, mu = self.prompt(down["global_prompt"]), self.options.mu
        return lambda ctx: 0.5 * mu * (ctx - anchor).pow(2).sum()


    def penalty_block(self, downs):
        has = [("global_prompt" in d) for d in downs]
        if not any(has):
            return None
        anchor = torch.stack([self.prompt(d["global_prompt"]) if h else torch.zeros(self.ctx_shape)
                              for d, h in zip(downs, has)])
        on, mu = torch.tensor(has, dtype=anchor.dtype), self.options.mu
        return lambda ctx: on * (0.5 * mu * (ctx - anchor.to(ctx.device)).pow(2).sum((1, 2)))


class FedProx(PromptFL):
    """PromptFL plus the proximal term mu/2 * ||ctx - ctx_global||^2 (FedProx, Li et al. 2020)."""
    Client = FedProxClient
