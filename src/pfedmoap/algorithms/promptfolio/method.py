"""PromptFolio (Pan et al., NeurIPS 2024, "Federated Learning from Vision-Language Foundation
Models: Theoretical Analysis and Method"; reference code PanBikang/PromptFolio,
trainers/PromptFolio.py and federated_main.py).

Every client holds two CoOp prompts: a global one, FedAvg'd over the round's participants as in
PromptFL, and a local one that never leaves the client. Class c is scored with the mixture of the
two prompts' L2-normalised text features,

    t_c = (1 - theta) * t_global_c + theta * t_local_c,   logits = logit_scale * x @ t^T

(not re-normalised, as the reference), so the logits are the same mixture of the two prompts'
CLIP logits. theta = `promptfolio.theta`: 0 is the global prompt alone (PromptFL), 1 the local one
alone (CoOp). Both prompts train together with cross-entropy on the mixed logits (one SGD over the
pair, the reference's single (2, n_ctx, W) parameter).

As the reference:

* Every client starts from the same pair, two different N(0, 0.02^2) draws (its one model's
  (2, n_ctx, W) context copied to every client); participants: a `train.frac` sample every round.
* Only the global prompt travels: downloaded by the participants (from round 2 on), uploaded with
  the sample count (FedAvg weights; not under DP): 4 (P + 1) bytes per participant (4 P under DP).
* Evaluation: the new global prompt with the client's own local prompt as it last trained it. The
  reference evaluates the round's participants only (`run.eval_clients = "participants"` does the
  same); the client takes the new global prompt in the download before it next trains, as the
  reference's `fed_download_model` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ... import rng
from ..base import ClientPart, Method, PromptState
from ..coop.method import PromptFLServer, prompt_exchange
from ..training import Group


@dataclass
class State(PromptState):
    """`ctx` is the client's copy of the global prompt, `local` its local prompt (never sent)."""
    local: torch.Tensor = None          # (n_ctx, W)


def mix(theta: float, t_global: torch.Tensor, t_local: torch.Tensor) -> torch.Tensor:
    """The portfolio of the two prompts' text features (C, D): (1 - theta) global + theta local."""
    return (1 - theta) * t_global + theta * t_local


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        # local prompts' text features (C, D) by client, with the prompt's bytes: a client part that
        # only evaluates (another class list) sees the states another part trains
        self._local: dict[int, tuple[bytes, torch.Tensor]] = {}
        self._global: tuple[bytes, torch.Tensor] | None = None    # (the global row's bytes, its (C, D))

    # -------------------------------------------------------------- state
    def init_state(self, cid: int) -> State:
        from ...clip.prompt import init_context
        ctx = super().init_state(cid).ctx
        # The same local prompt for every client, drawn apart from the global one (the reference's
        # two rows of one N(0, 0.02^2) draw). With prompt.init a phrase, both are that phrase.
        gen = rng.torch_generator(self.cfg.seed, "promptfolio-local-init")
        return State(ctx=ctx, local=init_context(self.backbone, self.cfg.prompt.n_ctx, self.cfg.prompt.init, gen))

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        return [state.ctx, state.local]

    def load_state_vector(self, state, vec) -> None:
        super().load_state_vector(state, vec)
        self._local.clear()
        self._global = None

    # -------------------------------------------------------------- a round
    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        self.train_pair(state, data, round_, cid)
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), **self.upload_count(data)}

    def released_rows(self):
        return 0                            # the pair's global prompt (the local one never leaves)

    def train_pair(self, state: State, data, round_: int, cid: int) -> float:
        """CoOp's local training (the prompt's recipe) of the (global, local) pair, one
        (2, n_ctx, W) tensor, with cross-entropy on the mixed logits. Returns the mean loss."""
        theta = self.options.theta
        pair = torch.stack([state.ctx, state.local]).clone().requires_grad_(True)

        def loss(x, y):
            text = mix(theta, self.encoder(pair[0]), self.encoder(pair[1]))
            return F.cross_entropy(self.logit_scale * x @ text.t(), y)

        value = self.local_train([Group([pair], self.recipe())], loss, data, round_, cid)
        state.ctx, state.local = pair[0].detach().clone(), pair[1].detach().clone()
        return value

    def global_text(self, row: np.ndarray) -> torch.Tensor:
        """The downloaded global prompt's text features, encoded once per rank and row."""
        key = np.asarray(row, np.float32).tobytes()
        if self._global is None or self._global[0] != key:
            with torch.no_grad():
                self._global = (key, self.encoder(self.prompt(row)))
        return self._global[1]

    def local_text(self, state: State, cid: int) -> torch.Tensor:
        """The client's local prompt's text features, encoded again only when the prompt changed."""
        key = state.local.numpy().tobytes()
        if cid not in self._local or self._local[cid][0] != key:
            with torch.no_grad():
                self._local[cid] = (key, self.encoder(state.local))
        return self._local[cid][1]

    def evaluate(self, state: State, data, round_, cid, down):
        text = mix(self.options.theta, self.global_text(down["global_prompt"]), self.local_text(state, cid))
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))

    def evaluate_global(self, state: State, data, round_, cid, down):
        """The global model: the global prompt alone."""
        if "global_prompt" not in down:
            return None
        text = self.global_text(down["global_prompt"])
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


class PromptFolio(Method):
    """A global (FedAvg) and a local prompt, text features mixed (1 - theta) : theta (PromptFolio, Pan et al. 2024)."""
    Server, Client = PromptFLServer, Client

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True, cfg=self.cfg)
