"""DP-FPL (Tran et al., ICLR 2025, "Privacy-Preserving Personalized Federated Prompt Learning for
Multimodal Large Language Models"; reference code linhhtran/DP-FPL, trainers/DP_FPL.py and
federated_main.py, factorization "dpfpl").

Every client holds a global prompt g (FedAvg'd as in PromptFL; the only thing that travels) and a
local prompt L that never leaves it. The prompt a client classifies with is

    g + U V + R,      (U, V, R) = factorize(L):  U (n_ctx, r), V (r, W) with orthonormal columns /
                                                 rows from one power iteration, R = L - U V,

so its value is g + L, but the gradient reaches L only through the low-rank part U V (R is a
constant of each step). Local DP, each step: the gradients of U and of V are each clipped to L2 norm
`dpfpl.clip` and get Gaussian noise (when `dpfpl.noise` > 0); L's update direction is then
s (G_U V + U G_V + U U^T G_U V) from those noisy gradients (s = `dpfpl.grad_scale`, the reference's
division by 10), stepped by SGD. The residual keeps the full-rank part of L that the noisy low-rank
updates built, as the paper's "residual" term.

Global DP is the project's `dp.*` mechanism on the uploaded global prompt (docs/privacy.md); the
reference instead adds noise to the average of the global prompt's gradient at every step.

The local noise is the reference's: std = sqrt(T ln(1/1e-5)) / noise * clip / B, T = rounds, B =
train.batch_size. The reference presents `noise` as the privacy level; the epsilon this spends is
computed here by the project's accountant (dp.py) under a stated relation and logged per client
and round as /rounds/local_dp_epsilon (see `local_epsilon`); nothing else about it is claimed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ... import dp, rng
from ..base import EvalResult, Log, Method, PromptState
from ..coop.method import PromptFLClient, PromptFLServer, prompt_exchange
from ..training import Group, Recipe

REFERENCE_DELTA = 1e-5      # trainers/DP_FPL.py: delta of its noise formula


def orthonormalize_(m: torch.Tensor) -> None:
    """Gram-Schmidt on the columns of m, in place, column by column (the reference's order)."""
    for i in range(m.shape[1]):
        m[:, i] /= m[:, i].norm()
        if i + 1 < m.shape[1]:
            m[:, i + 1:] -= (m[:, i:i + 1] * m[:, i + 1:]).sum(0) * m[:, i:i + 1]


@torch.no_grad()
def factorize(local: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power iteration from a Gaussian start: U (n_ctx, r) and V (r, W) with orthonormal columns
    / rows spanning L's leading subspaces, and the residual R = L - U V (exactly L = U V + R)."""
    v = torch.randn(local.shape[1], rank, generator=gen, dtype=local.dtype)
    u = local @ v
    orthonormalize_(u)
    v = local.t() @ u
    orthonormalize_(v)
    v = v.t().contiguous()
    return u, v, local - u @ v


def full_gradient(u: torch.Tensor, v: torch.Tensor, gu: torch.Tensor, gv: torch.Tensor, scale: float) -> torch.Tensor:
    """L's update direction from the (noisy) gradients of U and V: s (G_U V + U G_V + U U^T G_U V)."""
    gu, gv = gu * scale, gv * scale
    guv = gu @ v
    return guv + u @ gv + u @ (u.t() @ guv)


def local_noise_std(o, cfg) -> float:
    """The reference's noise std of each step's U and V gradient (0 without local DP)."""
    if o.noise <= 0:
        return 0.0
    sigma = math.sqrt(cfg.rounds * math.log(1 / REFERENCE_DELTA)) / o.noise
    return sigma * o.clip / cfg.train.batch_size


def local_noise_multiplier(o, cfg) -> float:
    """z = std / sensitivity of one step's release (G_U, G_V), each clipped to `clip`, under the
    relation "replace the client's whole local data set": ||(G_U, G_V) - (G_U', G_V')|| <= 2 sqrt(2) clip.
    The reference clips the batch-mean gradient, not each example's, so no smaller (per-example)
    sensitivity holds."""
    return local_noise_std(o, cfg) / (2 * math.sqrt(2) * o.clip)


class Server(PromptFLServer):
    """PromptFL's server: the global prompt down to the participants and to every client for
    evaluation, FedAvg of the uploads."""


@dataclass
class State(PromptState):
    """`ctx`: the client's copy of the global prompt; `local`: its local prompt L (never sent);
    `steps`: local steps trained so far (the local DP releases the ε log counts)."""
    local: torch.Tensor = None          # (n_ctx, W)
    steps: torch.Tensor = None          # (1,) float32


class Client(PromptFLClient):
    def __init__(self, method):
        super().__init__(method)
        n_ctx, width = self.ctx_shape
        self.rank = min(self.options.rank, n_ctx, width)      # U V cannot have a larger rank
        self.noise_std = local_noise_std(self.options, self.cfg)
        self._eps: dict[int, float] = {}
        self._uv = None                 # the current step's (U, V)

    def init_state(self, cid: int) -> State:
        from ...clip.prompt import init_context
        ctx = super().init_state(cid).ctx
        # one initial local prompt for every client (the reference copies one model's weights to all)
        gen = rng.torch_generator(self.cfg.seed, "dpfpl-local-init")
        local = init_context(self.backbone, self.cfg.prompt.n_ctx, "", gen)
        return State(ctx=ctx, local=local, steps=torch.zeros(1))

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        return [state.ctx, state.local, state.steps]

    def recipe(self) -> Recipe:
        return Recipe.from_train(self.cfg.train, lr=self.options.lr, schedule="constant")

    # -------------------------------------------------------------- training
    def fit(self, state: State, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        g = state.ctx.clone().requires_grad_(True)
        local = state.local.clone().requires_grad_(True)
        factor_gen = rng.torch_generator(self.cfg.seed, "dpfpl-factorize", round_, cid)
        self._noise_gen = rng.torch_generator(self.cfg.seed, "dpfpl-local-dp", round_, cid)
        self._steps = 0

        def loss(x, y):
            u, v, residual = factorize(local.detach(), self.rank, factor_gen)
            u.requires_grad_(True)
            v.requires_grad_(True)
            self._uv = (u, v)
            text = self.encoder(g + u @ v + residual)
            return F.cross_entropy(self.logit_scale * x @ text.t(), y)

        recipe = self.recipe()
        self.local_train([Group([g], recipe), Group([local], recipe)], loss, data, round_, cid)
        state.ctx, state.local = g.detach(), local.detach()
        state.steps = state.steps + self._steps
        self._uv = None
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), **self.upload_count(data)}

    def after_backward(self, groups) -> None:
        super().after_backward(groups)          # dp.mechanism "gradient": the global prompt's clip
        u, v = self._uv
        gu, gv = u.grad, v.grad
        if self.noise_std > 0:                  # local DP: clip each, then Gaussian noise
            for grad in (gu, gv):
                dp.clip_gradient_(grad, self.options.clip)
                grad.add_(torch.randn(grad.shape, generator=self._noise_gen) * self.noise_std)
        groups[1].params[0].grad = full_gradient(u.detach(), v.detach(), gu, gv, self.options.grad_scale)
        self._steps += 1

    # -------------------------------------------------------------- evaluation
    def local_epsilon(self, steps: int) -> float:
        """ε of the local DP after `steps` steps (NaN without it): each step a Gaussian mechanism
        with noise multiplier `local_noise_multiplier` (neighbours: the client's whole local data set
        replaced), composed without sampling (q = 1), at dp.delta; RDP accountant of dp.py."""
        if self.noise_std <= 0:
            return float("nan")
        if steps not in self._eps:
            z = local_noise_multiplier(self.options, self.cfg)
            self._eps[steps] = dp.epsilon(z, 1.0, steps, self.cfg.dp.delta, orders=dp.ORDERS)
        return self._eps[steps]

    def evaluate(self, state: State, data, round_, cid, down):
        """The new global prompt with the client's own local prompt: g + U V + R = g + L."""
        with torch.no_grad():
            text = self.encoder(self.prompt(down["global_prompt"]) + state.local)
        res = self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))
        res.logs["local_dp_epsilon"] = np.float32(self.local_epsilon(int(state.steps[0])))
        return res

    def evaluate_global(self, state, data, round_, cid, down) -> EvalResult:
        """The global prompt alone (as PromptFL's evaluation)."""
        return PromptFLClient.evaluate(self, state, data, round_, cid, down)


class DPFPL(Method):
    """A global (FedAvg) prompt plus a personal prompt whose low-rank part trains under local DP
    (DP-FPL, Tran et al. 2025)."""
    Server, Client = Server, Client

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True, cfg=self.cfg)

    def logs(self):
        return (Log("local_dp_epsilon", (), description=(
            "epsilon of the client's local prompt under DP-FPL's local DP (dpfpl.noise > 0; NaN without): "
            "its local steps so far, each a Gaussian mechanism on the clipped U and V gradients, "
            "neighbours = the client's whole local data set replaced, no sampling, at dp.delta, "
            "RDP accountant (dp.py); an upper bound")),)
