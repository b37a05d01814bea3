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
  (FedAvg weights), so a participant uploads 4 (P + 1) bytes.
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

from .. import rng
from ..config import register_section
from ..errors import PFedMoAPError
from ..ot import METHODS, STOPS, OTOptions, ot_logits
from . import register
from .base import ClientPart, Method, PromptState
from .training import Group
from .coop import PromptFLServer, prompt_exchange


@register_section("fedotp")
@dataclass
class FedOTPConfig:
    method: str = "cot"            # "cot" (partial OT, the reference's COT) | "sinkhorn" (balanced)
    eps: float = 0.1               # entropic regularisation
    thresh: float = 1e-3           # stop: mean |change| of the watched scaling vector below this
    max_iter: int = 100            # OT iterations at most
    top_percent: float = 0.8       # COT: mass moved (the published scripts' 0.8, see pfedmoap.ot)
    stop: str = "per_problem"      # "per_problem" | "batch" (the reference's rule)
    n_prompts: int = 2             # global + local; only 2 is supported
    all_clients_first_round: bool = True   # round 0 trains every client, as the reference does

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise PFedMoAPError(msg)
        need(self.method in METHODS, f"fedotp.method = {self.method!r}: expected one of {', '.join(METHODS)}")
        need(self.stop in STOPS, f"fedotp.stop = {self.stop!r}: expected one of {', '.join(STOPS)}")
        need(self.eps > 0, f"fedotp.eps = {self.eps}: expected > 0")
        need(self.thresh >= 0, f"fedotp.thresh = {self.thresh}: expected >= 0")
        need(1 <= self.max_iter <= 10 ** 6, f"fedotp.max_iter = {self.max_iter}: expected 1 to 1000000")
        need(0 < self.top_percent <= 1, f"fedotp.top_percent = {self.top_percent}: expected a fraction in (0, 1]")
        need(self.n_prompts == 2, f"fedotp.n_prompts = {self.n_prompts}: only 2 (one global and one local "
                                  f"prompt) is supported")

    def options(self) -> OTOptions:
        return OTOptions(method=self.method, eps=self.eps, top_percent=self.top_percent, thresh=self.thresh,
                         max_iter=self.max_iter, stop=self.stop)


class Server(PromptFLServer):
    """PromptFL's server (global prompt down to the participants and to every client for
    evaluation, FedAvg of the uploads); round 0 may train every client."""

    def participants(self, round_):
        if round_ == 0 and self.cfg.fedotp.all_clients_first_round:
            return np.arange(self.n_clients)
        return super().participants(round_)


@dataclass
class State(PromptState):
    """`ctx` is the client's copy of the global prompt, `local` its local prompt (never sent)."""
    local: torch.Tensor = None          # (n_ctx, W), on the CPU


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        self.options = self.cfg.fedotp.options()
        self._local: dict[int, torch.Tensor] = {}                 # local prompts' text features (C, D)
        self._global: tuple[int, torch.Tensor] | None = None      # (round, the global prompt's (C, D))

    # -------------------------------------------------------------- state
    def init_state(self, cid: int) -> State:
        from ..clip.prompt import init_context
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
        return ot_logits(patches, text, self.logit_scale, self.options)

    def _texts(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx (2, n_ctx, W) -> (2, C, D), differentiable; one prompt at a time (rank-count invariant)."""
        return torch.stack([self.encoder(ctx[0]), self.encoder(ctx[1])])

    # -------------------------------------------------------------- a round
    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        self.train_pair(state, data, round_, cid)
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), "n_samples": [len(data.train_y)]}

    def train_pair(self, state: State, data, round_: int, cid: int) -> float:
        """CoOp's local training (local_train with the prompt's recipe) of the (global, local) pair,
        one (2, n_ctx, W) tensor, on the OT logits of the patch features. Returns the mean loss
        (NaN without training images)."""
        self._local.pop(cid, None)          # its local prompt changes
        if len(data.train_y) == 0:
            return float("nan")
        if data.train_dense is None:
            raise RuntimeError("fedotp needs dense image features (Method.image_features = 'dense')")
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


@register
class FedOTP(Method):
    """Global (FedAvg) and local prompts matched to image patches by optimal transport (FedOTP, Li et al. 2024)."""
    name = "fedotp"
    image_features = "dense"
    Server, Client = Server, Client

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True)
