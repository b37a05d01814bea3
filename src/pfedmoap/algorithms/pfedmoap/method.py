"""pFedMoAP (Luo et al., ICLR 2025): the local prompt plus frozen non-local experts, mixed by a
client-side gating network.

Server: the pool (each client's latest upload), the global prompt (FedAvg, the start of every
participant's training) and the router, which picks K-1 experts from the pool for a client.
Client: its prompt, its gating network and the gating network's optimiser, which never leave it
(unless the `moe.aggregate_gate` ablation FedAvgs the gating networks like the prompt).

Participation (`moe.participation`), see docs/differences.md:
- "paper" (default: the paper's §3, and what the reference loop is written to do; its code does
  otherwise in places, docs/differences.md): a first-time participant (no entry in the pool)
  trains the global prompt without experts and uploads it; a returning participant
  trains with experts routed on the pool as it stood at the start of the round; after the round's
  uploads, a non-participant whose gating network has trained is evaluated with experts routed
  on the updated pool, one whose gate never trained with its prompt alone, and a client that never
  trained with the current global prompt.
- "snapshot": every client, every round, gets experts routed on the pool as it stood at the start
  of the round (first-time participants train with them too); never-trained clients are evaluated
  with their initial prompt. The behaviour of this project before issue 14.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import rng, router
from ...errors import PFedMoAPError
from ...clip.gating import GatingNetwork, LinearGate, moe_logits, moe_logits_block
from ...exchange import Array, Broadcast, PerClient
from ..base import Arrays, ClientPart, Log, Method, PromptState, ServerPart, fedavg, sample_count_array, sample_counts
from ..training import Group, Recipe


def _mask(n: int, ids) -> np.ndarray:
    m = np.zeros(n, bool)
    m[ids] = True
    return m


class Server(ServerPart):
    def __init__(self, method):
        super().__init__(method)
        N, P = self.n_clients, method.setup.prompt_size
        self.E, self.m = method.n_experts, self.options
        self.pool = np.zeros((N, P), np.float32)
        self.in_pool = np.zeros(N, bool)
        self.gate_trained = np.zeros(N, bool)     # the client has trained with experts at least once
        self.global_prompt: np.ndarray | None = None
        self.global_gating: np.ndarray | None = None
        self.expert_ids = np.full((N, self.E), -1, np.int32)
        self._routed = np.zeros(N, bool)          # clients with experts this round

    def _route(self, clients: np.ndarray, round_: int) -> np.ndarray:
        # a client that never uploaded is compared by the global prompt (knn)
        own = self.pool[clients]
        queries = np.where(self.in_pool[clients][:, None], own,
                           self.global_prompt if self.global_prompt is not None else 0.0)
        return router.route(self.m.router, self.pool, self.in_pool, queries, clients, self.E, self.cfg.seed, round_)

    def _experts(self, clients: np.ndarray, round_: int) -> dict:
        """The routed experts' prompts, without whose they are (the paper's App. C.2: a client does
        not learn where a non-local prompt came from); the ids stay in the server's log."""
        ids = self._route(clients, round_)
        self.expert_ids[clients] = ids
        self._routed[clients] = True
        valid = np.zeros(self.n_clients, np.int64)
        valid[clients] = (ids >= 0).sum(1)
        return {"experts": PerClient(self.pool[ids[ids >= 0]], valid)}

    def configure_fit(self, round_, participants):
        out = {}
        self.expert_ids[:] = -1
        self._routed[:] = False
        if self.global_prompt is not None:
            out["global_prompt"] = Broadcast(self.global_prompt, _mask(self.n_clients, participants))
        if self.global_gating is not None:
            out["global_gating"] = Broadcast(self.global_gating, _mask(self.n_clients, participants))
        if self.E:
            # routed on the pool as it stands before this round's uploads
            if self.m.participation == "snapshot":
                clients = np.arange(self.n_clients)       # also non-participants, evaluated with them
            else:
                clients = participants[self.in_pool[participants]]   # first-timers train without
            out.update(self._experts(clients, round_))
        return out

    def aggregate_fit(self, round_, participants, uploads):
        had = participants[(self.expert_ids[participants] >= 0).any(1)] if self.E else participants[:0]
        self.gate_trained[had] = True
        self.pool[participants] = uploads["prompt"]
        self.in_pool[participants] = True
        n = sample_counts(uploads)
        self.global_prompt = fedavg(uploads["prompt"], n)
        if "gating" in uploads:
            self.global_gating = fedavg(uploads["gating"], n)

    def configure_evaluate(self, round_, evaluated):
        out = {}
        if self.m.participation == "paper":
            everyone = np.arange(self.n_clients)
            never = ~self.in_pool
            if never.any():       # the global prompt: the initial one while nothing arrived (drop-out)
                g = self.initial_prompt() if self.global_prompt is None else self.global_prompt
                out["eval_prompt"] = Broadcast(g, never)
            if self.E:
                late = everyone[~self._routed & self.gate_trained]     # routed on the updated pool
                if len(late):
                    out.update(self._experts(late, round_))
        if self.global_gating is not None:
            out["global_gating"] = Broadcast(self.global_gating, np.ones(self.n_clients, bool))
        return out

    def logs(self):
        return {"experts": self.expert_ids.copy()} if self.E else {}

    def state_dict(self):
        empty = np.zeros(0, np.float32)
        return {"pool": self.pool, "in_pool": self.in_pool, "gate_trained": self.gate_trained,
                "global_prompt": empty if self.global_prompt is None else self.global_prompt,
                "global_gating": empty if self.global_gating is None else self.global_gating}

    def load_state_dict(self, state):
        self.pool[...] = state["pool"]
        self.in_pool[...] = state["in_pool"]
        self.gate_trained[...] = state["gate_trained"]
        g, gg = state["global_prompt"], state["global_gating"]
        self.global_prompt = np.array(g, np.float32) if len(g) else None
        self.global_gating = np.array(gg, np.float32) if len(gg) else None


@dataclass
class State(PromptState):
    gating: torch.nn.Module = None                 # on the backbone's device
    gating_opt: torch.optim.Optimizer = None


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        self.m = self.options
        self._experts: dict[int, torch.Tensor | None] = {}    # this round's expert features per client
        self._round = -1
        self._eval_text: tuple[int, torch.Tensor] | None = None

    def init_state(self, cid: int) -> State:
        ctx = super().init_state(cid).ctx
        m = self.m
        # shared: one init for every client, as the reference's single model gives them
        key = rng.key(self.cfg.seed, "gating-init", 0, cid if m.gating_init == "per_client" else 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            if m.gate == "linear":
                gating = LinearGate(self.backbone.embed_dim, m.gating_dim, m.n_experts)
            else:
                gating = GatingNetwork(self.backbone.embed_dim, m.gating_dim, m.gating_heads, m.scaling)
            gating = gating.to(self.backbone.device)
        # The gating optimiser belongs to the client and persists across rounds.
        opt = self.gating_recipe().sgd(gating.parameters())
        for p in gating.parameters():
            # A zero buffer is what SGD's first step (dampening 0) would create: explicit, so the
            # state has a fixed shape for checkpoints.
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return State(ctx=ctx, gating=gating, gating_opt=opt)

    def gating_recipe(self) -> Recipe:
        """The gating network's: SGD at the constant `moe.gating_lr`, [train]'s momentum and weight decay."""
        return Recipe.from_train(self.cfg.train, lr=self.m.gating_lr, schedule="constant")

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        params = list(state.gating.parameters())
        return [state.ctx, *params, *(state.gating_opt.state[p]["momentum_buffer"] for p in params)]

    def gating_vector(self, state: State) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1).cpu() for p in state.gating.parameters()]).numpy()

    def load_gating(self, state: State, row: np.ndarray) -> None:
        v, n = torch.from_numpy(np.array(row, np.float32)), 0
        with torch.no_grad():
            for p in state.gating.parameters():
                p.copy_(v[n:n + p.numel()].reshape(p.shape))
                n += p.numel()

    def prepare(self, round_, downloads):
        """Each distinct expert's text features, encoded once per rank (no graph: experts are frozen).
        Experts come without ids: the same prompt sent to several clients is known by its bytes."""
        if round_ != self._round:
            self._experts, self._round = {}, round_
        cache: dict[bytes, torch.Tensor] = {}
        for cid, d in downloads.items():
            if "experts" not in d:
                continue
            feats = []
            for row in d["experts"]:
                key = np.ascontiguousarray(row).tobytes()
                if key not in cache:
                    cache[key] = self.encoder.encode_frozen(self.prompt(row).unsqueeze(0))[0]
                feats.append(cache[key])
            self._experts[cid] = torch.stack(feats)

    def _mixture(self, own: torch.Tensor, cid: int) -> torch.Tensor:
        """(K, C, D): the local prompt's features first, then the experts'."""
        experts = self._experts.get(cid)
        return own.unsqueeze(0) if experts is None else torch.cat([own.unsqueeze(0), experts])

    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        if "global_gating" in down:
            self.load_gating(state, down["global_gating"])
        lam = self.m.lam
        gate = Group(list(state.gating.parameters()), self.gating_recipe(), state.gating_opt)
        self.train_prompt(state, data, round_, cid, others=(gate,),
                          logits=lambda own, x: moe_logits(state.gating, x, self._mixture(own, cid),
                                                           self.logit_scale, lam)[0])
        up = {"prompt": self.upload_prompt(state.ctx, round_, cid), **self.upload_count(data)}
        if self.m.aggregate_gate:
            up["gating"] = self.gating_vector(state)
        return up

    # Blocks: the prompts are trained batched (one text pass over the block's B*C sequences); each
    # client's gating network runs per client on its slice (its own module, its own persistent
    # optimiser, stepped only while the client trains).
    block_training = True

    def fit_block(self, states, datas, round_, cids, downs):
        if len(cids) == 1:
            return super().fit_block(states, datas, round_, cids, downs)
        for s, dn in zip(states, downs):
            if "global_prompt" in dn:
                s.ctx = self.prompt(dn["global_prompt"])
            if "global_gating" in dn:
                self.load_gating(s, dn["global_gating"])
        lam = self.m.lam
        if isinstance(states[0].gating, GatingNetwork):
            self._fit_block_stacked_gates(states, datas, round_, cids)
        else:       # the linear gate: each client's gate on its slice, its own optimiser
            gates = tuple(Group(list(s.gating.parameters()), self.gating_recipe(), s.gating_opt, client=b)
                          for b, s in enumerate(states))

            def logits(text, x):
                return torch.stack([moe_logits(s.gating, x[b], self._mixture(text[b], c), self.logit_scale, lam)[0]
                                    for b, (s, c) in enumerate(zip(states, cids))])

            self.train_prompt_block(states, datas, round_, cids, others=gates, logits=logits)
        ups = []
        for s, d, c in zip(states, datas, cids):
            up = {"prompt": self.upload_prompt(s.ctx, round_, c), **self.upload_count(d)}
            if self.m.aggregate_gate:
                up["gating"] = self.gating_vector(s)
            ups.append(up)
        return ups

    def _fit_block_stacked_gates(self, states, datas, round_, cids):
        """The block's attention gates stacked too: their parameters and persistent momentum
        buffers (B, ...) trained by one StackedSGD of the gating recipe (moe_logits_block), then
        written back to each client's module and optimiser. A client without experts does not use
        its gate (as alone, where its gate gets no gradient): its gate and momentum stay as they are."""
        names = [n for n, _ in states[0].gating.named_parameters()]
        mods = [dict(s.gating.named_parameters()) for s in states]
        params = [torch.stack([m[n].detach() for m in mods]).requires_grad_(True) for n in names]
        momentum = [torch.stack([s.gating_opt.state[m[n]]["momentum_buffer"] for s, m in zip(states, mods)])
                    for n in names]
        experts = [self._experts.get(c) for c in cids]
        n_valid = [1 + (0 if e is None else len(e)) for e in experts]
        K = max(n_valid)
        if K == 1:          # nobody has experts (e.g. first-time participants): CLIP's logits, gates untouched
            self.train_prompt_block(states, datas, round_, cids)
            return
        gate = Group(params, self.gating_recipe(), momentum=momentum, trains=[n > 1 for n in n_valid])
        named = dict(zip(names, params))

        # the experts' features, padded to K - 1 per client, once per block (they are frozen)
        C, D = self.encoder.n_classes, self.backbone.embed_dim
        dev = next(states[0].gating.parameters()).device
        pad = torch.zeros(len(cids), K - 1, C, D, device=dev)
        for b, e in enumerate(experts):
            if e is not None and len(e):
                pad[b, :len(e)] = e.to(dev)

        def logits(text, x):                  # text (B, C, D): the local prompts' features
            full = torch.cat([text.unsqueeze(1), pad.to(text.dtype)], dim=1)
            return moe_logits_block(named, states[0].gating, x, full, n_valid, self.logit_scale, self.m.lam)

        self.train_prompt_block(states, datas, round_, cids, others=(gate,), logits=logits)
        with torch.no_grad():
            for b, (s, m) in enumerate(zip(states, mods)):
                for i, n in enumerate(names):
                    m[n].copy_(params[i][b])
                    if gate.momentum is not None and self.gating_recipe().momentum:
                        s.gating_opt.state[m[n]]["momentum_buffer"].copy_(gate.momentum[i][b])

    def evaluate_block(self, states, datas, round_, cids, downs):
        if len(cids) == 1:
            return super().evaluate_block(states, datas, round_, cids, downs)
        trained = [b for b, dn in enumerate(downs) if "eval_prompt" not in dn]
        self.own_texts([states[b] for b in trained], [cids[b] for b in trained])   # one batched pass
        return [self.evaluate(s, d, round_, c, dn) for s, d, c, dn in zip(states, datas, cids, downs)]

    def evaluate(self, state: State, data, round_, cid, down):
        if "global_gating" in down:
            self.load_gating(state, down["global_gating"])
        if "eval_prompt" in down:          # never trained: the current global prompt, no experts
            if self._eval_text is None or self._eval_text[0] != round_:
                with torch.no_grad():
                    self._eval_text = (round_, self.encoder(self.prompt(down["eval_prompt"])))
            text = self._eval_text[1].unsqueeze(0)
        else:
            text = self._mixture(self.own_text(state, cid), cid)
        return self.score(data, lambda x: moe_logits(state.gating, x, text, self.logit_scale, self.m.lam))


class PFedMoAP(Method):
    Server, Client = Server, Client

    def __init__(self, setup):
        super().__init__(setup)
        self.n_experts = self.options.n_experts - 1       # non-local experts per client
        if self.options.aggregate_gate and self.cfg.dp.clip > 0:
            raise PFedMoAPError("moe.aggregate_gate = true with dp.clip > 0: the gating network would be uploaded "
                                "without clipping or noise; set moe.aggregate_gate = false to run with DP")

    def arrays(self) -> Arrays:
        P, E, m = self.setup.prompt_size, self.n_experts, self.options
        experts = (Array("experts", P),) if E else ()
        gating = ()
        up = (Array("prompt", P), *sample_count_array(self.cfg))
        if m.aggregate_gate:
            G = self._gating_size()
            gating = (Array("global_gating", G, broadcast=True),)
            up += (Array("gating", G),)
        eval_prompt = (Array("eval_prompt", P, broadcast=True),) if m.participation == "paper" else ()
        return Arrays(fit_down=(Array("global_prompt", P, broadcast=True), *gating, *experts),
                      up=up, eval_down=(*eval_prompt, *experts, *gating))

    def _gating_size(self) -> int:
        m, D = self.options, self.setup.backbone.embed_dim
        gate = LinearGate(D, m.gating_dim, m.n_experts) if m.gate == "linear" else \
            GatingNetwork(D, m.gating_dim, m.gating_heads, m.scaling)
        return sum(p.numel() for p in gate.parameters())

    def logs(self) -> tuple[Log, ...]:
        if not self.n_experts:
            return ()
        K = self.n_experts + 1
        return (Log("experts", (K - 1,), "int32", -1, "server",
                    "non-local expert client ids the client trained or was evaluated with, -1 padded"),
                Log("gate_weight", (K,), "float32", float("nan"), "client",
                    "mean gating weight per expert on the test split, local first; NaN where none"))
