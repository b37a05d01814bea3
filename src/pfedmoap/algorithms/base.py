"""The small interface every method implements (as Flower's strategy hooks).

Client side: `init_client`, `start_round`, `fit`, `text_features`, `logits`; server side:
`aggregate`. The round loop (federation.py) owns everything else: who trains, what travels, logging.
An algorithm sees clients and tensors, never ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import rng


@dataclass
class ClientData:
    train_x: torch.Tensor   # (n, D) cached, L2-normalised image features
    train_y: torch.Tensor   # (n,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_views: torch.Tensor | None = None   # (V, n, D) augmented views; a random one per image per epoch


@dataclass
class ClientState:
    """Everything a client keeps between rounds. Only `ctx` may ever leave the client."""
    ctx: torch.Tensor                   # (n_ctx, W), on the CPU (small; the encoder moves it)
    gating: torch.nn.Module | None = None   # on the backbone's device
    gating_opt: torch.optim.Optimizer | None = None


@dataclass
class EvalResult:
    accuracy: float
    macro_f1: float
    loss: float
    gate_weight: np.ndarray | None = None   # (K,) mean gating weight per expert, local first
    correct: np.ndarray | None = None       # (n_test,) bool: each test image classified right


def macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Macro-F1 over the classes present in the truth or the predictions."""
    scores = []
    for c in np.union1d(pred, true):
        tp = np.sum((pred == c) & (true == c))
        denom = np.sum(pred == c) + np.sum(true == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


class Algorithm:
    name = ""
    trains = True             # zeroshot: evaluation only
    shares_prompt = True      # clients upload prompts and the server averages them
    uses_experts = False      # the server routes non-local experts to each client
    eval_with_global = False  # evaluated with the global prompt instead of the local one

    def __init__(self, cfg, encoder, backbone):
        self.cfg, self.encoder, self.backbone = cfg, encoder, backbone
        self.logit_scale = backbone.logit_scale

    # ------------------------------------------------------------------ client side
    def init_client(self, cid: int) -> ClientState:
        from ..clip.prompt import init_context
        # One initial prompt for every client, as a server would broadcast it: a client's prompt
        # differs from another's only by what it learned.
        gen = rng.torch_generator(self.cfg.seed, "ctx-init")
        return ClientState(ctx=init_context(self.backbone, self.cfg.prompt.n_ctx, self.cfg.prompt.init, gen))

    def start_round(self, state: ClientState, global_prompt: torch.Tensor | None) -> None:
        """Called before training; federated methods start from the global prompt."""
        if global_prompt is not None:
            state.ctx = global_prompt.clone()

    def penalty(self, ctx: torch.Tensor, global_prompt: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0

    def logits(self, state: ClientState, x: torch.Tensor, text: torch.Tensor):
        """x (B, D) image features; text (K, C, D), local first. -> (logits, gating weights or None)."""
        return self.logit_scale * x @ text[0].t(), None

    def lr_at(self, epoch: int) -> float:
        """Constant warm-up, then cosine over the round's local epochs (CoOp's schedule)."""
        t = self.cfg.train
        if epoch < t.warmup_epochs:
            return t.warmup_lr
        return 0.5 * t.lr * (1 + math.cos(math.pi * (epoch - t.warmup_epochs) / t.local_epochs))

    def fit(self, state: ClientState, data: ClientData, round_: int, cid: int,
            global_prompt: torch.Tensor | None, experts: torch.Tensor | None) -> float:
        """Local training; `experts` (E, C, D) are frozen expert text features. Returns mean loss."""
        t = self.cfg.train
        if len(data.train_y) == 0:       # a client with no training images keeps its state
            return float("nan")
        ctx = state.ctx.clone().requires_grad_(True)
        opt = torch.optim.SGD([ctx], lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        gen = rng.torch_generator(self.cfg.seed, "batches", round_, cid)
        n = len(data.train_y)
        bs = min(t.batch_size, n)
        losses = []
        for epoch in range(t.local_epochs):
            for g in opt.param_groups:
                g["lr"] = self.lr_at(epoch)
            perm = torch.randperm(n, generator=gen)
            x_all = data.train_x
            if data.train_views is not None:
                view = torch.randint(len(data.train_views), (n,), generator=gen)
                x_all = data.train_views[view, torch.arange(n)]
            for start in range(0, n - bs + 1, bs):        # drop the last partial batch, as CoOp does
                idx = perm[start:start + bs]
                feats = self.encoder(ctx).unsqueeze(0)
                text = feats if experts is None or len(experts) == 0 else torch.cat([feats, experts])
                logits, _ = self.logits(state, x_all[idx], text)
                loss = F.cross_entropy(logits, data.train_y[idx]) + self.penalty(ctx, global_prompt)
                opt.zero_grad(set_to_none=True)
                if state.gating_opt is not None:
                    state.gating_opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if state.gating_opt is not None:
                    state.gating_opt.step()
                losses.append(float(loss.detach()))
        state.ctx = ctx.detach()
        return float(np.mean(losses)) if losses else float("nan")

    def text_features(self, state: ClientState, global_prompt: torch.Tensor | None) -> torch.Tensor:
        """(C, D) features of the prompt this client is evaluated with."""
        use = global_prompt if (self.eval_with_global and global_prompt is not None) else state.ctx
        with torch.no_grad():
            return self.encoder(use)

    @torch.no_grad()
    def evaluate(self, state: ClientState, data: ClientData, text: torch.Tensor) -> EvalResult:
        """text (K, C, D): the client's own features first, then its experts'."""
        preds, losses, weights = [], [], []
        if state.gating is not None:
            state.gating.eval()
        bs = self.cfg.train.eval_batch_size
        for start in range(0, len(data.test_y), bs):
            x, y = data.test_x[start:start + bs], data.test_y[start:start + bs]
            logits, w = self.logits(state, x, text)
            preds.append(logits.argmax(-1))
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            if w is not None:
                weights.append(w.sum(dim=(0, 1)) / w.shape[1])
        if state.gating is not None:
            state.gating.train()
        n = len(data.test_y)
        if n == 0:
            return EvalResult(float("nan"), float("nan"), float("nan"), correct=np.zeros(0, bool))
        pred = torch.cat(preds).cpu().numpy()
        true = data.test_y.cpu().numpy()
        gw = (torch.stack(weights).sum(0) / n).cpu().numpy() if weights else None
        return EvalResult(float((pred == true).mean()), macro_f1(pred, true), float(sum(losses)) / n, gw,
                          pred == true)

    # ------------------------------------------------------------------ server side
    @staticmethod
    def aggregate(prompts: np.ndarray, n_samples: np.ndarray) -> np.ndarray:
        """FedAvg: the sample-count-weighted mean of the uploaded prompts (rows)."""
        w = n_samples.astype(np.float64) / n_samples.sum()
        return (w @ prompts.astype(np.float64)).astype(np.float32)

    # ------------------------------------------------------------------ checkpoints
    def state_vector(self, state: ClientState) -> np.ndarray:
        """Everything the client keeps, flat (its ctx, gating and optimiser state)."""
        parts = [state.ctx]
        if state.gating is not None:
            parts += list(state.gating.parameters())
            parts += [state.gating_opt.state[p]["momentum_buffer"] for p in state.gating.parameters()]
        return torch.cat([p.detach().reshape(-1).cpu() for p in parts]).numpy().astype(np.float32)

    def load_state_vector(self, state: ClientState, vec: np.ndarray) -> None:
        v = torch.from_numpy(np.asarray(vec, np.float32))
        n = state.ctx.numel()
        state.ctx = v[:n].reshape(state.ctx.shape).clone()
        if state.gating is not None:
            params = list(state.gating.parameters())
            with torch.no_grad():
                for p in params:
                    p.copy_(v[n:n + p.numel()].reshape(p.shape))
                    n += p.numel()
            for p in params:
                state.gating_opt.state[p]["momentum_buffer"].copy_(v[n:n + p.numel()].reshape(p.shape))
                n += p.numel()
