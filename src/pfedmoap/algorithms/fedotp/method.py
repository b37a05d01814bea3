"""FedOTP (Li et al., CVPR 2024, "Global and Local Prompts Cooperation via Optimal Transport for
Federated Learning"; reference code HongxiaLee/FedOTP, trainers/GLP_OT.py and federated_main.py).

Every client holds two CoOp prompts: a global one, FedAvg'd over the round's participants as in
PromptFL, and a local one that never leaves the client. Class c of an image is scored by entropic
optimal transport between the image's M patch features and the two prompts' text features of c
(`pfedmoap.ot.ot_logits`): logits = logit_scale * sum_{m,n} T[m, n] sim[m, n]. The plan T carries
no gradient; both prompts learn through sim, with one SGD over the pair (the reference's single
(2, n_ctx, W) parameter). The pooled image feature does not enter the logits.

As the reference (federated_main.py, model "FedOTP"):

* Round 0 trains every client (`fedotp.all_clients_first_round`, default on), later rounds a
  `train.frac` sample; participants start from the current global prompt and their own local one.
* Only the global prompt travels: downloaded by the participants, uploaded with the sample count
  (FedAvg weights; not under DP), so a participant uploads 4 (P + 1) bytes (4 P under DP).
* Evaluation, every client every round: the new global prompt (the FedAvg just computed, sent to
  every client) with the client's own local prompt as it last trained it. The reference's client
  also keeps that global prompt as its own (`local_weights_per`); here it takes it when it next
  trains (the download before training), which is what the reference's next training starts from,
  so that evaluation changes no client state (issue 21).

Differences: the OT plan is solved in the log domain with a per-problem stop by default (see
`pfedmoap.ot`); the reference's optimiser state is shared across clients by its single trainer
object, here each participant starts SGD afresh each round (as the other CoOp methods here).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ... import rng
from ...ot import OTOptions, ot_logits
from ..base import ClientPart, Method, PromptState
from ..coop.method import PromptFLServer, prompt_exchange
from ..training import Group


def ot_options(o) -> OTOptions:
    """The OT solver's options from the [fedotp] section (FedOTPOptions)."""
    return OTOptions(method=o.method, eps=o.eps, top_percent=o.top_percent, thresh=o.thresh,
                     max_iter=o.max_iter, stop=o.stop)


class Server(PromptFLServer):
    """PromptFL's server (global prompt down to the participants and to every client for
    evaluation, FedAvg of the uploads); round 0 may train every client."""

    def participants(self, round_):
        if round_ == 0 and self.options.all_clients_first_round:
            return np.arange(self.n_clients)
        return super().participants(round_)


@dataclass
class State(PromptState):
    """`ctx` is the client's copy of the global prompt, `local` its local prompt (never sent)."""
    local: torch.Tensor = None          # (n_ctx, W), on the CPU


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        self.ot = ot_options(self.options)
        self._local: dict[int, torch.Tensor] = {}                 # local prompts' text features (C, D)
        self._global: tuple[int, torch.Tensor] | None = None      # (round, the global prompt's (C, D))

    # -------------------------------------------------------------- state
    def init_state(self, cid: int) -> State:
        from ...clip.prompt import init_context
        ctx = super().init_state(cid).ctx
        # The same initial local prompt for every client (the reference copies one model's pair to
        # all); drawn apart from the global one. With prompt.init a phrase, both are that phrase.
        gen = rng.torch_generator(self.cfg.seed, "fedotp-local-init")
        return State(ctx=ctx, local=init_context(self.backbone, self.cfg.prompt.n_ctx, self.cfg.prompt.init, gen))

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        return [state.ctx, state.local]

    def load_state_vector(self, state, vec) -> None:
        super().load_state_vector(state, vec)
        self._local.clear()
        self._global = None

    # -------------------------------------------------------------- logits
    def logits(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """text (2, C, D): global then local prompt; patches (B, M, D) -> (B, C)."""
        return ot_logits(patches, text, self.logit_scale, self.ot)

    def _texts(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx (2, n_ctx, W) -> (2, C, D), differentiable; one prompt at a time (rank-count invariant)."""
        return torch.stack([self.encoder(ctx[0]), self.encoder(ctx[1])])

    # -------------------------------------------------------------- a round
    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        self.train_pair(state, data, round_, cid)
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), **self.upload_count(data)}

    def released_rows(self):
        return 0                            # the pair's global prompt (the local one never leaves)

    def train_pair(self, state: State, data, round_: int, cid: int) -> float:
        """CoOp's local training (local_train with the prompt's recipe) of the (global, local) pair,
        one (2, n_ctx, W) tensor, on the OT logits of the patch features. Returns the mean loss
        (NaN without training images)."""
        self._local.pop(cid, None)          # its local prompt changes
        if len(data.train_y) == 0:
            return float("nan")
        if data.train_dense is None:
            raise RuntimeError("fedotp needs dense image features (its manifest's DataNeeds(dense=True))")
        pair = torch.stack([state.ctx, state.local]).clone().requires_grad_(True)
        loss = self.local_train([Group([pair], self.recipe())],
                                lambda x, y: F.cross_entropy(self.logits(self._texts(pair), x), y),
                                data, round_, cid, inputs=lambda epoch, gen: data.train_dense)
        state.ctx, state.local = pair[0].detach().clone(), pair[1].detach().clone()
        return loss

    def evaluate(self, state: State, data, round_, cid, down):
        g = down["global_prompt"]
        if self._global is None or self._global[0] != round_:        # once per rank and round
            with torch.no_grad():
                self._global = (round_, self.encoder(self.prompt(g)))
        if cid not in self._local:
            with torch.no_grad():
                self._local[cid] = self.encoder(state.local)
        text = torch.stack([self._global[1], self._local[cid]])
        return self.score(replace(data, test_x=data.test_dense), lambda x: (self.logits(text, x), None))

    def evaluate_global(self, state: State, data, round_, cid, down):
        """The global model: the global prompt alone, scored as CLIP scores a CoOp prompt (the
        pooled image feature against its text features). FedOTP's OT needs a client's local prompt
        beside the global one (with one prompt the plan is uniform); the global prompt is a CoOp
        prompt trained by FedAvg, as PromptFL's."""
        if self._global is None or self._global[0] != round_:
            with torch.no_grad():
                self._global = (round_, self.encoder(self.prompt(down["global_prompt"])))
        text = self._global[1]
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


class FedOTP(Method):
    """Global (FedAvg) and local prompts matched to image patches by optimal transport (FedOTP, Li et al. 2024)."""
    Server, Client = Server, Client

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True, cfg=self.cfg)
