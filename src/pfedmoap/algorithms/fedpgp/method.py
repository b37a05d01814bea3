"""FedPGP (Cui et al., ICML 2024, "Harmonizing Generalization and Personalization in Federated
Prompt Learning"; reference code TianyuCuiOvO/FedPGP, trainers/fedpgp.py and federated_main.py).

Every client holds the global prompt sigma (n_ctx, W), FedAvg'd over the round's participants as in
PromptFL, and a low-rank personal term U (n_ctx, r) @ V (r, W) that never leaves it. Its personal
prompt is sigma + U V; classification uses the personal prompt's text features. The loss adds
mu times a prompt-wise contrastive term to the cross-entropy: for every class c,

    -log( exp(cos(t0_c, ts_c) / temp) / (exp(cos(t0_c, ts_c) / temp) + exp(cos(ts_c, tp_c) / temp)) )

averaged over the classes, where t0 are the frozen CLIP's text features of the initial prompt text
(the reference's placeholder "X X ... X <class>.", or prompt.init's phrase), ts those of sigma and tp
those of the personal prompt: sigma is pulled towards CLIP (the positive pair) and pushed away from
the personal prompt (the negative pair). sigma, U and V train together (one SGD, the reference's one
optimiser over the prompt learner).

As the reference (federated_main.py, model "FedPGP"):

* Round 0 trains every client (`fedpgp.all_clients_first_round`), later rounds a `train.frac` sample.
  Every client starts from the same sigma, U and V (the reference loads one model's weights into
  every client in round 0), each N(0, 0.02^2).
* Only sigma travels: downloaded by the participants, uploaded with the sample count (FedAvg's
  weight; not under DP), 4 (P + 1) bytes per participant (4 P under DP).
* Evaluation, every client every round: the new global sigma plus the client's own U V, as it last
  trained them. The reference also stores the new sigma as the client's (`local_weights_per`); here
  the client takes it in the download before it next trains, which is what the reference's next
  training starts from, so evaluation changes no client state.

Differences (docs/differences.md): SGD starts afresh per client and round (the reference's optimiser
object is shared by the clients in sequence); the reference also encodes U V alone in every step
without using it in the loss, which changes nothing and is not done here.
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


class Server(PromptFLServer):
    """PromptFL's server (sigma down to the participants and to every client for evaluation, FedAvg
    of the uploads); round 0 may train every client."""

    def participants(self, round_):
        if round_ == 0 and self.options.all_clients_first_round:
            return np.arange(self.n_clients)
        return super().participants(round_)


@dataclass
class State(PromptState):
    """`ctx` is the client's copy of the global prompt sigma; `u`, `v` its personal low-rank term."""
    u: torch.Tensor = None          # (n_ctx, r), never sent
    v: torch.Tensor = None          # (r, W), never sent


def contrastive_loss(t0: torch.Tensor, ts: torch.Tensor, tp: torch.Tensor, temp: float) -> torch.Tensor:
    """The prompt-wise contrastive loss over the classes: (C, D) L2-normalised text features of the
    frozen CLIP prompt (t0), of sigma (ts) and of the personal prompt (tp); positive (t0, ts),
    negative (ts, tp)."""
    logits = torch.stack([(t0 * ts).sum(-1), (ts * tp).sum(-1)], dim=1) / temp
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        self._anchor: torch.Tensor | None = None                 # t0, (C, D)
        self._global: tuple[bytes, torch.Tensor] | None = None   # (sigma's bytes, its (C, D))

    # -------------------------------------------------------------- state
    def init_state(self, cid: int) -> State:
        ctx = super().init_state(cid).ctx
        # One U, V for every client, as the reference's one model copied to all; drawn apart from sigma.
        gen = rng.torch_generator(self.cfg.seed, "fedpgp-uv-init")
        r = self.options.rank
        return State(ctx=ctx, u=torch.randn(ctx.shape[0], r, generator=gen) * 0.02,
                     v=torch.randn(r, ctx.shape[1], generator=gen) * 0.02)

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        return [state.ctx, state.u, state.v]

    def load_state_vector(self, state, vec) -> None:
        super().load_state_vector(state, vec)
        self._global = None

    @staticmethod
    def personal(sigma: torch.Tensor, state: State) -> torch.Tensor:
        """The personal prompt: sigma + U V."""
        return sigma + state.u @ state.v

    def anchor(self) -> torch.Tensor:
        """t0: the frozen CLIP's text features of the initial prompt text, the prompt.init phrase or
        the placeholder "X X ... X" every prompt's tokens are built from (trainers/fedpgp.py:
        `embedding`, the token embeddings of that text)."""
        if self._anchor is None:
            from ...clip.prompt import init_context
            phrase = self.cfg.prompt.init or " ".join(["X"] * self.ctx_shape[0])
            words = init_context(self.backbone, self.ctx_shape[0], phrase, None)
            with torch.no_grad():
                self._anchor = self.encoder(words)
        return self._anchor

    # -------------------------------------------------------------- a round
    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        self.train_pgp(state, data, round_, cid)
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), **self.upload_count(data)}

    def train_pgp(self, state: State, data, round_: int, cid: int) -> float:
        """CoOp's local training (the prompt's recipe) of sigma, U and V on cross-entropy of the
        personal prompt plus mu times the contrastive loss. Returns the mean loss."""
        o, t0 = self.options, self.anchor()
        sigma, u, v = (t.clone().requires_grad_(True) for t in (state.ctx, state.u, state.v))

        def loss(x, y):
            ts, tp = self.encoder(sigma), self.encoder(sigma + u @ v)
            return F.cross_entropy(self.logit_scale * x @ tp.t(), y) + o.mu * contrastive_loss(t0, ts, tp, o.temp)

        value = self.local_train([Group([sigma, u, v], self.recipe())], loss, data, round_, cid)
        state.ctx, state.u, state.v = sigma.detach(), u.detach(), v.detach()
        return value

    def global_text(self, row: np.ndarray) -> torch.Tensor:
        """The downloaded sigma's text features, encoded once per rank and row."""
        key = np.asarray(row, np.float32).tobytes()
        if self._global is None or self._global[0] != key:
            with torch.no_grad():
                self._global = (key, self.encoder(self.prompt(row)))
        return self._global[1]

    def evaluate(self, state: State, data, round_, cid, down):
        with torch.no_grad():
            text = self.encoder(self.personal(self.prompt(down["global_prompt"]), state))
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))

    def evaluate_global(self, state: State, data, round_, cid, down):
        """The global model: sigma alone, without the client's U V."""
        if "global_prompt" not in down:
            return None
        text = self.global_text(down["global_prompt"])
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


class FedPGP(Method):
    """Global prompt (FedAvg) + a personal low-rank term U V and a CLIP-guided contrastive loss
    (FedPGP, Cui et al. 2024)."""
    Server, Client = Server, Client

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True, cfg=self.cfg)
