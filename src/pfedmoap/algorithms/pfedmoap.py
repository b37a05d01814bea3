"""pFedMoAP (Luo et al., ICLR 2025): the local prompt plus frozen non-local experts, mixed by a
client-side gating network.

Server: the pool (each client's latest upload), the global prompt (FedAvg, the start of every
participant's training) and the router, which picks K-1 experts from the pool for every client
each round. Client: its prompt, its gating network and the gating network's optimiser, which
never leave it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import rng, router
from ..clip.gating import GatingNetwork, moe_logits
from . import register
from .base import Array, Arrays, Broadcast, ClientPart, Log, Method, PerClient, PromptState, ServerPart, fedavg


class Server(ServerPart):
    def __init__(self, method):
        super().__init__(method)
        N, P = self.n_clients, method.setup.prompt_size
        self.E = method.n_experts
        self.pool = np.zeros((N, P), np.float32)
        self.in_pool = np.zeros(N, bool)
        self.global_prompt: np.ndarray | None = None
        self.expert_ids = np.zeros((N, self.E), np.int32)

    def configure_fit(self, round_, participants):
        out = {}
        if self.global_prompt is not None:
            to = np.zeros(self.n_clients, bool)
            to[participants] = True
            out["global_prompt"] = Broadcast(self.global_prompt, to)
        if self.E:
            # every client gets experts (also non-participants: they are evaluated with them),
            # routed on the pool as it stands before this round's uploads
            clients = np.arange(self.n_clients)
            # a client that never uploaded is compared by the global prompt (knn)
            queries = np.where(self.in_pool[:, None], self.pool,
                               self.global_prompt if self.global_prompt is not None else 0.0)
            ids = router.route(self.cfg.moe.router, self.pool, self.in_pool, queries, clients, self.E,
                               self.cfg.seed, round_)
            self.expert_ids = ids
            out["expert_ids"] = PerClient(ids, np.ones(self.n_clients, np.int64))
            out["experts"] = PerClient(self.pool[ids[ids >= 0]], (ids >= 0).sum(1))
        return out

    def aggregate_fit(self, round_, participants, uploads):
        self.pool[participants] = uploads["prompt"]
        self.in_pool[participants] = True
        self.global_prompt = fedavg(uploads["prompt"], uploads["n_samples"][:, 0])

    def logs(self):
        return {"experts": self.expert_ids} if self.E else {}

    def state_dict(self):
        return {"pool": self.pool, "in_pool": self.in_pool,
                "global_prompt": np.zeros(0, np.float32) if self.global_prompt is None else self.global_prompt}

    def load_state_dict(self, state):
        self.pool[...] = state["pool"]
        self.in_pool[...] = state["in_pool"]
        g = state["global_prompt"]
        self.global_prompt = np.array(g, np.float32) if len(g) else None


@dataclass
class State(PromptState):
    gating: torch.nn.Module = None                 # on the backbone's device
    gating_opt: torch.optim.Optimizer = None


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        self._experts: dict[int, torch.Tensor | None] = {}    # this round's expert features per client

    def init_state(self, cid: int) -> State:
        ctx = super().init_state(cid).ctx
        m, t = self.cfg.moe, self.cfg.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.key(self.cfg.seed, "gating-init", 0, cid))
            gating = GatingNetwork(self.backbone.embed_dim, m.gating_dim, m.gating_heads,
                                   m.scaling).to(self.backbone.device)
        # The gating optimiser belongs to the client and persists across rounds.
        opt = torch.optim.SGD(gating.parameters(), lr=m.gating_lr, momentum=t.momentum, weight_decay=t.weight_decay)
        for p in gating.parameters():
            # A zero buffer is what SGD's first step (dampening 0) would create: explicit, so the
            # state has a fixed shape for checkpoints.
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return State(ctx=ctx, gating=gating, gating_opt=opt)

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        params = list(state.gating.parameters())
        return [state.ctx, *params, *(state.gating_opt.state[p]["momentum_buffer"] for p in params)]

    def prepare(self, round_, downloads):
        """Each distinct expert's text features, encoded once per rank (no graph: experts are frozen)."""
        if not any("expert_ids" in d for d in downloads.values()):
            return
        cache: dict[int, torch.Tensor] = {}
        self._experts = {}
        for cid, d in downloads.items():
            ids = d["expert_ids"].reshape(-1)
            feats = []
            for row, e in zip(d["experts"], ids[ids >= 0]):
                if int(e) not in cache:
                    cache[int(e)] = self.encoder.encode_frozen(self.prompt(row).unsqueeze(0))[0]
                feats.append(cache[int(e)])
            self._experts[cid] = torch.stack(feats) if feats else None

    def _mixture(self, own: torch.Tensor, cid: int) -> torch.Tensor:
        """(K, C, D): the local prompt's features first, then the experts'."""
        experts = self._experts.get(cid)
        return own.unsqueeze(0) if experts is None else torch.cat([own.unsqueeze(0), experts])

    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        lam = self.cfg.moe.lam
        self.train_prompt(state, data, round_, cid, others=(state.gating_opt,),
                          logits=lambda own, x: moe_logits(state.gating, x, self._mixture(own, cid),
                                                           self.logit_scale, lam)[0])
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), "n_samples": [len(data.train_y)]}

    def evaluate(self, state: State, data, round_, cid, down):
        text = self._mixture(self.own_text(state, cid), cid)
        return self.score(data, lambda x: moe_logits(state.gating, x, text, self.logit_scale, self.cfg.moe.lam))


@register
class PFedMoAP(Method):
    name = "pfedmoap"
    Server, Client = Server, Client

    def __init__(self, setup):
        super().__init__(setup)
        self.n_experts = self.cfg.moe.n_experts - 1       # non-local experts per client

    def arrays(self) -> Arrays:
        P, E = self.setup.prompt_size, self.n_experts
        experts = (Array("expert_ids", E, "int32"), Array("experts", P)) if E else ()
        return Arrays(fit_down=(Array("global_prompt", P, broadcast=True), *experts),
                      up=(Array("prompt", P), Array("n_samples", 1)))

    def logs(self) -> tuple[Log, ...]:
        if not self.n_experts:
            return ()
        K = self.n_experts + 1
        return (Log("experts", (K - 1,), "int32", -1, "server", "non-local expert client ids received, -1 padded"),
                Log("gate_weight", (K,), "float32", float("nan"), "client",
                    "mean gating weight per expert on the test split, local first; NaN where none"))
