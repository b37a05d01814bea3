"""Local training, written once for every method: one client's SGD over its keyed batches.

A method says what it trains and how (`Group`s of tensors, each with its `Recipe`), what the loss
of a batch is (a closure over those tensors), and whose batches they are (`Batches`, drawn from the
client's keyed generator); `train` runs the epochs. CoOp's prompt training (ClientPart.train_prompt),
PromptFL+FT's fine-tuning, FedOTP's prompt pair and pFedMoAP's prompt + gating network all go
through it (docs/methods.md, "Local training").

Per step, in this order: the batch's loss (+ penalty), a finiteness check, zero_grad, backward,
the `after_backward` hook (the place for per-step gradient processing, e.g. clipping), then each
group's optimiser steps, in group order.

A block of clients (train.client_block) goes through the same loop (`train_block`): each client's
`Batches` and `Recipe.lr_at` are as here, its tensors stacked with the block's and optimised by
`StackedSGD`, torch.optim.SGD's update per client.
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
    client: int | None = None       # in a block (train_block): None = stacked over the block, b = client b's own
    # a stacked group: its persistent momentum buffers, stacked (StackedSGD starts from them and
    # leaves its last ones here), and which clients it trains (None: all; False: untouched, as a
    # torch optimizer whose tensors got no gradient)
    momentum: list[torch.Tensor] | None = None
    trains: list[bool] | None = None


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


def _steps(batches: Batches, epochs: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, x, y) of every local step of one client, drawn lazily from its own generator (so a
    client's draws are in the same order whether it trains alone or in a block)."""
    if len(batches) == 0:
        return
    for epoch in range(epochs):
        for x, y in batches.epoch(epoch):
            yield epoch, x, y


class _TorchSGD:
    """A group's torch.optim.SGD (its persistent one, or a fresh one of its recipe), for one client."""

    def __init__(self, group: Group, epochs: int):
        self.group, self.epochs = group, epochs
        self.opt = group.optimizer if group.optimizer is not None else group.recipe.sgd(group.params)

    def set_epochs(self, epochs_now: list) -> None:
        e = epochs_now[self.group.client or 0]
        if e is not None:
            for pg in self.opt.param_groups:
                pg["lr"] = self.group.recipe.lr_at(e, self.epochs)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, active: list[bool]) -> None:
        if active[self.group.client or 0]:      # a client whose steps are done is not touched
            self.opt.step()


class StackedSGD:
    """torch.optim.SGD's update (momentum with dampening 0, weight decay, no Nesterov) for a block of
    clients' tensors stacked on dim 0, with each client's own learning rate (its recipe's `lr_at` of
    its own local epoch) and momentum buffer (zero at the start: SGD's first step then equals
    torch's `buf = grad`). A client marked inactive (its steps are done) keeps its tensors and its
    momentum exactly: the update is masked, not the gradient (weight decay and momentum would move
    them). Fresh per call, as a Group without an optimizer."""

    def __init__(self, group: Group, epochs: int):
        self.group, self.epochs, self.recipe = group, epochs, group.recipe
        self.bufs = None
        if self.recipe.momentum:
            self.bufs = group.momentum if group.momentum is not None else [torch.zeros_like(p) for p in group.params]
        self.lr = torch.zeros(group.params[0].shape[0], dtype=group.params[0].dtype, device=group.params[0].device)

    def set_epochs(self, epochs_now: list) -> None:
        key = tuple(epochs_now)
        if key != getattr(self, "_key", None):          # new tensors only when an epoch changes
            self._key = key
            self.lr = torch.tensor([0.0 if e is None else self.recipe.lr_at(e, self.epochs) for e in epochs_now],
                                   dtype=self.lr.dtype).to(self.lr.device)

    def zero_grad(self) -> None:
        for p in self.group.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: list[bool]) -> None:
        r = self.recipe
        if self.group.trains is not None:
            active = [a and t for a, t in zip(active, self.group.trains)]
        if tuple(active) != getattr(self, "_active_key", None):
            self._active_key, self._act = tuple(active), torch.tensor(active, device=self.lr.device)
        act = self._act
        for i, p in enumerate(self.group.params):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            a = act.view(shape)
            d = p.grad if not r.weight_decay else p.grad.add(p, alpha=r.weight_decay)
            every = all(active)        # the same values as the masked update, fewer ops
            if self.bufs is not None:
                buf = self.bufs[i] * r.momentum + d
                self.bufs[i] = buf if every else torch.where(a, buf, self.bufs[i])
                d = self.bufs[i]
            new = p - self.lr.view(shape) * d
            p.copy_(new if every else torch.where(a, new, p))


def train(groups: Sequence[Group], loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          batches: Batches, epochs: int, *, penalty: Callable[[], torch.Tensor] | None = None,
          after_backward: Callable[[Sequence[Group]], None] | None = None, where: str = "") -> float:
    """SGD of every group for `epochs` local epochs over `batches`; `loss(x, y)` is a batch's loss
    (a closure over the groups' tensors), `penalty()` is added to it each step. Returns the mean
    loss over the steps (NaN for a client without training images, whose tensors stay as they are).
    A non-finite loss stops the run: one line naming `where` (e.g. "round 3, client 7")."""
    def forward(items):
        (_, x, y), = items
        value = loss(x, y)
        if penalty is not None:
            value = value + penalty()
        return value.reshape(1)

    hook = None if after_backward is None else (lambda active: after_backward(groups))
    return _run([_TorchSGD(g, epochs) for g in groups], forward, [batches], epochs, hook, [where])[0]


def train_block(groups: Sequence[Group], loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                batches: Sequence[Batches], epochs: int, *, penalty: Callable[[], torch.Tensor] | None = None,
                after_backward: Callable[[Sequence[Group], list[bool]], None] | None = None,
                where: Sequence[str] = ()) -> list[float]:
    """`train` for a block of B clients in one batched computation. A group with `client` None is
    stacked (its params (B, ...), dim 0 the client; StackedSGD of its recipe, fresh per call); a group
    with `client` b is client b's own (e.g. a module with its persistent optimizer), stepped only
    while client b trains. Each client draws its batches from its own `Batches` as `train` would;
    step t is every client's t-th step, clients whose steps are done are masked.

    `loss(x, y, w)` -> (B,) per-client losses of the step's batches padded to (B, bs_max, ...):
    w (B, bs_max) is 1/bs_b on client b's real rows and 0 on padding and on masked clients, so
    `(per_row_loss * w).sum(1)` is each client's mean. `penalty()` -> (B,) is added. The summed loss
    is differentiated once: client b's gradient is that of its own loss. Returns each client's mean loss."""
    def forward(items):
        live = [it for it in items if it is not None]
        sizes = [0 if it is None else len(it[2]) for it in items]
        bs = max(sizes)
        x0, y0 = live[0][1], live[0][2]
        if min(sizes) == bs:            # every client trains and has a full batch of bs: no padding
            X, Y = torch.stack([it[1] for it in items]), torch.stack([it[2] for it in items])
        else:
            X = x0.new_zeros((len(items), bs, *x0.shape[1:]))
            Y = y0.new_zeros((len(items), bs))
            for b, it in enumerate(items):
                if it is not None:
                    X[b, :sizes[b]], Y[b, :sizes[b]] = it[1], it[2]
        W = torch.tensor([[1.0 / n] * n + [0.0] * (bs - n) if n else [0.0] * bs for n in sizes], device=x0.device)
        value = loss(X, Y, W)
        if penalty is not None:
            value = value + penalty()
        return value

    opts = [StackedSGD(g, epochs) if g.client is None else _TorchSGD(g, epochs) for g in groups]
    hook = None if after_backward is None else (lambda active: after_backward(groups, active))
    return _run(opts, forward, list(batches), epochs, hook, list(where) or [""] * len(batches))


def _run(opts, forward, batches: list[Batches], epochs: int, hook, where: list[str]) -> list[float]:
    """The one training loop, for one client or a block: each step the clients still training take
    their next batch, the per-client losses (B,) are computed, checked, summed and differentiated,
    the hook sees the gradients, every optimiser steps its active clients."""
    streams = [_steps(b, epochs) for b in batches]
    losses: list[list[float]] = [[] for _ in batches]
    while True:
        items = [next(s, None) for s in streams]
        active = [it is not None for it in items]
        if not any(active):
            break
        epochs_now = [None if it is None else it[0] for it in items]
        for opt in opts:
            opt.set_epochs(epochs_now)
        value = forward(items)
        values = value.detach().tolist()
        for b, v in enumerate(values):
            if active[b] and not math.isfinite(v):
                raise PFedMoAPError(f"{where[b]}: training loss is {v} in local epoch "
                                    f"{epochs_now[b] + 1} (diverged? lower the learning rate, check "
                                    f"dp.noise_multiplier and the method's options); the run stops, its "
                                    f"last checkpoint is the last good state")
        for opt in opts:
            opt.zero_grad()
        if len(items) == 1:
            value[0].backward()
        else:
            live = value if all(active) else torch.where(torch.tensor(active, device=value.device), value,
                                                          torch.zeros_like(value))
            live.sum().backward()
        if hook is not None:
            hook(active)
        for opt in opts:
            opt.step(active)
        for b, v in enumerate(values):
            if active[b]:
                losses[b].append(v)
    return [float(np.mean(x)) if x else float("nan") for x in losses]
