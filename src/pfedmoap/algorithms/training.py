"""Local training, written once for every method: one client's SGD over its keyed batches.

A method says what it trains and how (`Group`s of tensors, each with its `Recipe`), what the loss
of a batch is (a closure over those tensors), and whose batches they are (`Batches`, drawn from the
client's keyed generator); `train` runs the epochs. CoOp's prompt training (ClientPart.train_prompt),
PromptFL+FT's fine-tuning, FedOTP's prompt pair and pFedMoAP's prompt + gating network all go
through it (docs/methods.md, "Local training").

Per step, in this order: the batch's loss (+ penalty), a finiteness check, zero_grad, backward,
the `after_backward` hook (the place for per-step gradient processing, e.g. clipping), then each
group's optimiser steps, in group order.

The pieces are separate so that a method training a block of clients in one batched computation
can reuse them per client: each client's `Batches` and `Recipe.lr_at` are as here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import PFedMoAPError

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    """How a group of tensors is optimised: SGD with momentum and weight decay, and its learning
    rate per local epoch: "cosine" (`warmup_epochs` at `warmup_lr`, then a cosine from `lr` over
    the round's epochs: CoOp's schedule) or "constant" (`lr` throughout)."""
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise PFedMoAPError(f"schedule = {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")

    @classmethod
    def from_train(cls, train, **changes) -> "Recipe":
        """CoOp's recipe from the [train] section (`changes` override fields, e.g. a constant schedule)."""
        return replace(cls(lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                           schedule="cosine", warmup_epochs=train.warmup_epochs, warmup_lr=train.warmup_lr),
                       **changes)

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The learning rate of local epoch `epoch` (0-based) of `epochs`."""
        if self.schedule == "constant":
            return self.lr
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / epochs))

    def sgd(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@dataclass
class Group:
    """Tensors trained together: leaves with requires_grad (a prompt, a module's parameters), updated
    in place. `optimizer`: a persistent one whose state (momentum) carries across rounds, kept by the
    caller; None: a fresh SGD of `recipe` for this call (momentum starts at zero every round)."""
    params: list[torch.Tensor]
    recipe: Recipe
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class Batches:
    """One client's training batches, drawn from its own keyed generator (rng.torch_generator(seed,
    purpose, round, client)): each local epoch a permutation of its n images, then that epoch's
    inputs (`inputs(epoch, gen)`, which may draw augmented views from the same generator), cut into
    full batches of min(size, n) images; the last partial batch is dropped, as CoOp does."""
    labels: torch.Tensor                                            # (n,)
    inputs: Callable[[int, torch.Generator], torch.Tensor]          # epoch -> (n, ...) inputs
    size: int
    gen: torch.Generator

    def __len__(self) -> int:
        return len(self.labels)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        bs = min(self.size, n)
        perm = torch.randperm(n, generator=self.gen)
        x_all = self.inputs(epoch, self.gen)
        for start in range(0, n - bs + 1, bs):
            idx = perm[start:start + bs]
            yield x_all[idx], self.labels[idx]


def train(groups: Sequence[Group], loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          batches: Batches, epochs: int, *, penalty: Callable[[], torch.Tensor] | None = None,
          after_backward: Callable[[Sequence[Group]], None] | None = None, where: str = "") -> float:
    """SGD of every group for `epochs` local epochs over `batches`; `loss(x, y)` is a batch's loss
    (a closure over the groups' tensors), `penalty()` is added to it each step. Returns the mean
    loss over the steps (NaN for a client without training images, whose tensors stay as they are).
    A non-finite loss stops the run: one line naming `where` (e.g. "round 3, client 7")."""
    if len(batches) == 0:
        return float("nan")
    opts = [g.optimizer if g.optimizer is not None else g.recipe.sgd(g.params) for g in groups]
    losses = []
    for epoch in range(epochs):
        for g, opt in zip(groups, opts):
            for pg in opt.param_groups:
                pg["lr"] = g.recipe.lr_at(epoch, epochs)
        for x, y in batches.epoch(epoch):
            value = loss(x, y)
            if penalty is not None:
                value = value + penalty()
            if not torch.isfinite(value):
                raise PFedMoAPError(f"{where}: training loss is {float(value.detach())} in local epoch "
                                    f"{epoch + 1} (diverged? lower the learning rate, check "
                                    f"dp.noise_multiplier and the method's options); the run stops, its "
                                    f"last checkpoint is the last good state")
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            value.backward()
            if after_backward is not None:
                after_backward(groups)
            for opt in opts:
                opt.step()
            losses.append(float(value.detach()))
    return float(np.mean(losses)) if losses else float("nan")
