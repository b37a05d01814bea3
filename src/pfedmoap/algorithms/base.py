"""The method interface: what a method declares, its server part and its client part.

A method is a package `algorithms/<name>/`: its manifest (`__init__.py`: name, options, data
needs; algorithms/manifest.py) and its implementation (`method.py`), a `Method` subclass (see
docs/methods.md for a worked example). The implementation declares, on every rank alike,

- the arrays it moves (`arrays()`): rows of `width` values that go down to clients before training
  (`fit_down`), up from the round's participants (`up`) and down again before evaluation
  (`eval_down`); a `broadcast` array is one row for every recipient (one Bcast), any other array
  gives each client its own number of rows (one Scatterv / Gatherv per array per round);
- the per-client values it logs each round (`logs()`), written to results.h5 under `/rounds/<name>`;

and it brings two parts, as Flower's strategy and client, or FedLab's handlers:

- `Server` (rank 0): everything the server keeps for the method; it picks the round's
  participants and turns their uploads into the next downloads;
- `Client` (every rank hosting clients; one object per rank, many client states): builds, trains
  and evaluates a client's state given that client's downloads, and flattens the state for
  checkpoints.

The round loop (federation.py) moves the arrays, counts their bytes, times and logs; it never sees
what they mean. Nothing here knows about ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import dp, rng
from ..exchange import Array, Broadcast, PerClient
from . import training
from .training import Group, Recipe


# ---------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Arrays:
    fit_down: tuple[Array, ...] = ()    # server -> clients, before training
    up: tuple[Array, ...] = ()          # participants -> server, one row each, after training
    eval_down: tuple[Array, ...] = ()   # server -> clients, before evaluation


@dataclass(frozen=True)
class Log:
    """A value logged per client and round under /rounds/<name>; shape (R, N, *shape)."""
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    fill: float = float("nan")      # clients without a value this round
    side: str = "client"            # "client": returned by Client.evaluate; "server": Server.logs
    description: str = ""


@dataclass
class Setup:
    """What both parts are built from (the same on every rank)."""
    cfg: object                      # config.Config
    n_clients: int
    encoder: object                  # clip.prompt.PromptEncoder
    backbone: object                 # clip.backbone.Backbone
    ctx_shape: tuple[int, int]       # (n_ctx, width) of one prompt
    dp_noise: float = 0.0            # the noise multiplier uploads get (dp.noise_multiplier, or solved from dp.epsilon)
    dp_sensitivity: float = 0.0      # the L2 sensitivity of an upload (docs/privacy.md); noise std = dp_noise * it
    # The encoder of the class names the clients train on, where `encoder` holds others: a client
    # part built to evaluate on other classes (docs/protocols.md) trains, if its evaluation trains
    # (PromptFL+FT's fine-tuning), only with the training classes. None: `encoder`.
    train_encoder: object = None

    @property
    def prompt_size(self) -> int:
        return int(np.prod(self.ctx_shape))


# ---------------------------------------------------------------------------- client data and results

@dataclass
class ClientData:
    train_x: torch.Tensor   # (n, D) cached, L2-normalised image features
    train_y: torch.Tensor   # (n,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_views: torch.Tensor | None = None   # (V, n, D) augmented views; a random one per image per epoch
    train_dense: torch.Tensor | None = None   # (n, M, D) float16, L2-normalised patch features (DataNeeds.dense)
    test_dense: torch.Tensor | None = None    # (n_test, M, D) likewise
    # data.augment = "fresh": (round, local epoch) -> (n, D), a new view of every image, precomputed
    # outside the training step (data/features.py FreshViews)
    fresh_views: Callable[[int, int], torch.Tensor] | None = None
    # DataNeeds.images: the client's images for the image tower (data/features.py ClientImages):
    # `.test` (n_test, 3, H, W) and `.train(round, epoch, gen)` (n, 3, H, W), augmented as data.augment says
    images: object | None = None

    def train_features(self, round_: int, epoch: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """(n, D): the training features of local epoch `epoch` of round `round_`: the clean ones
        (data.augment = "none"), one of the V cached views per image drawn from `gen` ("views"), or
        each image's fresh view of (round, epoch) ("fresh")."""
        if self.train_views is not None:
            n = len(self.train_y)
            view = torch.randint(len(self.train_views), (n,), generator=gen)
            return self.train_views[view, torch.arange(n)]
        if self.fresh_views is not None:
            return self.fresh_views(round_, epoch)
        return self.train_x


@dataclass
class EvalResult:
    accuracy: float
    macro_f1: float
    loss: float
    correct: np.ndarray | None = None       # (n_test,) bool: each test image classified right
    logs: dict[str, np.ndarray] = field(default_factory=dict)   # the method's client-side logs


def macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Macro-F1 over the classes present in the truth or the predictions."""
    scores = []
    for c in np.union1d(pred, true):
        tp = np.sum((pred == c) & (true == c))
        denom = np.sum(pred == c) + np.sum(true == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def fedavg(prompts: np.ndarray, n_samples: np.ndarray | None) -> np.ndarray:
    """FedAvg: the sample-count-weighted mean of the uploaded prompts (rows); the plain mean
    without counts (under DP the count does not travel: it is not covered by the noise)."""
    if n_samples is None:
        n_samples = np.ones(len(prompts))
    w = n_samples.astype(np.float64) / n_samples.sum()
    return (w @ prompts.astype(np.float64)).astype(np.float32)


def sample_count_array(cfg) -> tuple[Array, ...]:
    """The `n_samples` upload (FedAvg's weight), declared only without DP (docs/privacy.md)."""
    return () if cfg.dp.clip > 0 else (Array("n_samples", 1),)


def sample_counts(uploads: dict[str, np.ndarray]) -> np.ndarray | None:
    """The participants' uploaded sample counts, None under DP (then FedAvg weighs them equally)."""
    return uploads["n_samples"][:, 0] if "n_samples" in uploads else None


def sample_participants(seed: int, round_: int, n_clients: int, frac: float, rounding: str = "floor") -> np.ndarray:
    """The round's participants (sorted client ids), a pure function of the seed and the round.

    max(1, floor(frac * N)) of them, as the reference code counts (`rounding="round"`: nearest)."""
    m = max(1, int(frac * n_clients) if rounding == "floor" else int(round(frac * n_clients)))
    if m >= n_clients:
        return np.arange(n_clients)
    return np.sort(rng.numpy_rng(seed, "participants", round_).choice(n_clients, m, replace=False))


# ---------------------------------------------------------------------------- the two parts

class ServerPart:
    """Rank 0's side. The default: every round a `train.frac` sample of clients trains, nothing moves."""

    def __init__(self, method: "Method"):
        self.method, self.cfg, self.n_clients = method, method.cfg, method.setup.n_clients
        self.options = method.options       # the method's own options (its manifest's section), or None

    def participants(self, round_: int) -> np.ndarray:
        t = self.cfg.train
        return sample_participants(self.cfg.seed, round_, self.n_clients, t.frac, t.frac_rounding)

    def configure_fit(self, round_: int, participants: np.ndarray) -> dict[str, Broadcast | PerClient]:
        """Payloads of the `fit_down` arrays; an array left out is not sent this round."""
        return {}

    def aggregate_fit(self, round_: int, participants: np.ndarray, uploads: dict[str, np.ndarray]) -> None:
        """uploads[name]: (len(participants), width) rows, in participant order."""

    def configure_evaluate(self, round_: int, evaluated: np.ndarray) -> dict[str, Broadcast | PerClient]:
        """Payloads of the `eval_down` arrays. evaluated: (N,) bool, the clients this round evaluates
        (at least one; the loop drops what is sent to the others, and a server may skip their work)."""
        return {}

    def initial_prompt(self) -> np.ndarray:
        """The initial prompt every client starts from (`ClientPart.init_state`'s), flat: the
        server's global prompt while no upload has arrived yet (every participant so far dropped
        out, train.drop_rate)."""
        from ..clip.prompt import init_context
        gen = rng.torch_generator(self.cfg.seed, "ctx-init")
        ctx = init_context(self.method.setup.backbone, self.cfg.prompt.n_ctx, self.cfg.prompt.init, gen)
        return ctx.detach().cpu().reshape(-1).numpy().astype(np.float32)

    def logs(self) -> dict[str, np.ndarray]:
        """The round's server-side logs, (N, *shape) each."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass


@dataclass
class PromptState:
    """A client's CoOp prompt; the other parts of a client's state extend it."""
    ctx: torch.Tensor                   # (n_ctx, W), on the CPU (small; the encoder moves it)


class ClientPart:
    """One per rank: builds, trains and evaluates the states of the clients this rank hosts.

    The default is a CoOp client: one prompt, trained with cross-entropy on its images, evaluated
    with its own prompt's text features (cached until the prompt changes)."""

    def __init__(self, method: "Method"):
        s = method.setup
        self.method, self.cfg, self.options = method, method.cfg, method.options
        self.encoder, self.backbone, self.ctx_shape = s.encoder, s.backbone, s.ctx_shape
        self.train_encoder = s.train_encoder or s.encoder
        self.logit_scale = s.backbone.logit_scale
        self._text: dict[int, torch.Tensor] = {}     # evaluation text features of unchanged prompts
        self._purpose = "batches"                    # of the local training under way (after_backward)

    # -------------------------------------------------------------- state
    def init_state(self, cid: int) -> PromptState:
        from ..clip.prompt import init_context
        # One initial prompt for every client, as a server would broadcast it: a client's prompt
        # differs from another's only by what it learned.
        gen = rng.torch_generator(self.cfg.seed, "ctx-init")
        return PromptState(ctx=init_context(self.backbone, self.cfg.prompt.n_ctx, self.cfg.prompt.init, gen))

    def state_vector(self, state) -> np.ndarray:
        """Everything the client keeps, flat float32 (for checkpoints)."""
        return torch.cat([p.detach().reshape(-1).cpu() for p in self.state_tensors(state)]).numpy().astype(np.float32)

    def load_state_vector(self, state, vec: np.ndarray) -> None:
        v = torch.from_numpy(np.asarray(vec, np.float32))
        n = 0
        for t in self.state_tensors(state):
            with torch.no_grad():
                t.copy_(v[n:n + t.numel()].reshape(t.shape))
            n += t.numel()
        self._text.clear()

    def state_tensors(self, state) -> list[torch.Tensor]:
        """The tensors `state_vector` flattens, in order (copied into in place when loading)."""
        return [state.ctx]

    # -------------------------------------------------------------- a round
    def prepare(self, round_: int, downloads: dict[int, dict[str, np.ndarray]]) -> None:
        """Work shared by this rank's clients on an exchange's downloads (e.g. encode each expert once)."""

    def fit(self, state, data: ClientData, round_: int, cid: int, down: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Train on the client's data given its downloads; returns its uploads (one row per `up` array)."""
        self.train_prompt(state, data, round_, cid)
        return {}

    def evaluate(self, state, data: ClientData, round_: int, cid: int, down: dict[str, np.ndarray]) -> EvalResult:
        text = self.own_text(state, cid).unsqueeze(0)
        return self.score(data, lambda x: (self.logit_scale * x @ text[0].t(), None))

    def evaluate_global(self, state, data: ClientData, round_: int, cid: int,
                        down: dict[str, np.ndarray]) -> EvalResult | None:
        """The method's global model (where it has one) on `data`'s test split; None: it has none.
        Asked by the evaluation protocols that report it (eval.protocol "dual", "base2novel"),
        with the client's downloads of the round (fit and evaluation)."""
        return None

    # -------------------------------------------------------------- blocks of clients
    # The round loop hands the client part its hosted clients a block at a time. The defaults train
    # and evaluate them one by one; a method that trains a block in one batched computation sets
    # `block_training` and overrides `fit_block`/`evaluate_block` (train_prompt_block is CoOp's
    # batched training). Blocks are the clients of one id-block (id // train.client_block): ranks
    # host whole id-blocks (comm.place_clients), so a block is the same at any number of ranks.
    block_training = False

    def __init_subclass__(cls, **kwargs):
        # A subclass that changes `fit` or `evaluate` trains one client at a time unless it says
        # otherwise: an inherited batched path would bypass its own per-client code.
        super().__init_subclass__(**kwargs)
        if ("fit" in cls.__dict__ or "evaluate" in cls.__dict__) and "block_training" not in cls.__dict__:
            cls.block_training = False

    def blocks(self, cids: list[int]) -> list[list[int]]:
        """This rank's clients of a phase (ascending ids), grouped into the blocks the loop hands over."""
        B = self.cfg.train.client_block
        if B == 1 or not self.block_training:
            return [[c] for c in cids]
        out: dict[int, list[int]] = {}
        for c in cids:
            out.setdefault(c // B, []).append(c)
        return list(out.values())

    def fit_block(self, states: list, datas: list[ClientData], round_: int, cids: list[int],
                  downs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """`fit` for each client of the block; the uploads, in block order. The default with
        `block_training` (CoOp, nothing sent): the block's prompts trained together."""
        if len(cids) == 1 or not self.block_training:
            return [self.fit(s, d, round_, c, dn) for s, d, c, dn in zip(states, datas, cids, downs)]
        self.train_prompt_block(states, datas, round_, cids)
        return [{} for _ in cids]

    def evaluate_block(self, states: list, datas: list[ClientData], round_: int, cids: list[int],
                       downs: list[dict[str, np.ndarray]]) -> list[EvalResult]:
        """`evaluate` for each client of the block; the results, in block order. The default with
        `block_training` (CoOp): the block's prompts encoded in one pass, each client scored with its own."""
        if len(cids) == 1 or not self.block_training:
            return [self.evaluate(s, d, round_, c, dn) for s, d, c, dn in zip(states, datas, cids, downs)]
        texts = self.own_texts(states, cids)
        return [self.score(d, lambda x, t=t: (self.logit_scale * x @ t.t(), None)) for d, t in zip(datas, texts)]

    # -------------------------------------------------------------- shared machinery
    def prompt(self, row: np.ndarray) -> torch.Tensor:
        """A downloaded prompt row as a (n_ctx, W) tensor."""
        return torch.from_numpy(np.array(row, np.float32)).reshape(self.ctx_shape)

    def upload_prompt(self, ctx: torch.Tensor, round_: int, cid: int) -> np.ndarray:
        """The copy of a prompt that leaves the client: noised (dp.mechanism "gradient", its steps'
        gradients were clipped), or clipped and noised ("upload"), when dp is on."""
        d, s = self.cfg.dp, self.method.setup
        row, gen = ctx.reshape(-1).cpu().numpy(), rng.numpy_rng(self.cfg.seed, "dp", round_, cid)
        if d.clip > 0 and d.mechanism == "gradient":
            return dp.add_noise(row, s.dp_noise * s.dp_sensitivity, gen)
        return dp.privatize(row, d.clip, s.dp_noise, gen)

    def upload_count(self, data: ClientData) -> dict[str, list[int]]:
        """FedAvg's weight, uploaded only without DP (see `sample_count_array`)."""
        return {} if self.cfg.dp.clip > 0 else {"n_samples": [len(data.train_y)]}

    def gradient_clip(self) -> float:
        """C, the L2 bound of each local step's gradient of the uploaded rows; 0: no clipping (also
        for a method that uploads nothing: its training releases nothing)."""
        d = self.cfg.dp
        return d.clip if d.clip > 0 and d.mechanism == "gradient" and self.method.arrays().up else 0.0

    def released_rows(self):
        """Index into the trained tensor of the rows a participant uploads (their gradient is what
        dp.mechanism "gradient" clips): the whole prompt by default."""
        return slice(None)

    def step_lrs(self, n: int) -> list[float]:
        """The learning rate of each local step of a round for a client with n training images
        (the prompt's recipe and `training.Batches`: full batches of min(batch_size, n))."""
        t, r = self.cfg.train, self.recipe()
        if n == 0:
            return []
        per_epoch = n // min(t.batch_size, n)
        return [r.lr_at(e, t.local_epochs) for e in range(t.local_epochs) for _ in range(per_epoch)]

    def upload_sensitivity(self, n: int) -> float:
        """S / C of a client with n training images under dp.mechanism "gradient" (docs/privacy.md)."""
        r = self.recipe()
        return dp.gradient_sensitivity(self.step_lrs(n), r.momentum, r.weight_decay)

    def own_text(self, state, cid: int) -> torch.Tensor:
        """(C, D) text features of the client's prompt; a client that did not train keeps them."""
        if cid not in self._text:
            with torch.no_grad():
                self._text[cid] = self.encoder(state.ctx)
        return self._text[cid]

    def own_texts(self, states: list, cids: list[int]) -> list[torch.Tensor]:
        """`own_text` of a block of clients; those not cached are encoded in one batched pass."""
        todo = [b for b, c in enumerate(cids) if c not in self._text]
        if todo:
            with torch.no_grad():
                feats = self.encoder.encode_block(torch.stack([states[b].ctx for b in todo]))
            for b, f in zip(todo, feats):
                self._text[cids[b]] = f
        return [self._text[c] for c in cids]

    def recipe(self) -> Recipe:
        """How the prompt is optimised: CoOp's recipe from [train] (a method may set its own)."""
        return Recipe.from_train(self.cfg.train)

    def after_backward(self, groups) -> None:
        """Called every training step between backward and the optimiser steps, with the trained
        groups (their gradients set): the place for per-step gradient processing. Here: under
        dp.mechanism "gradient", the round's training (purpose "batches", whose result is uploaded)
        clips the gradient of the uploaded rows to dp.clip; PromptFL+FT's evaluation fine-tuning
        releases nothing and is not clipped."""
        clip = self.gradient_clip()
        if clip and self._purpose == "batches":
            dp.clip_gradient_(groups[0].params[0].grad[self.released_rows()], clip)

    def after_backward_block(self, groups, active: list[bool]) -> None:
        """`after_backward` for a block (train_block): the stacked prompt's gradient clipped per
        active client (client b's gradient is that of its own loss)."""
        clip = self.gradient_clip()
        if clip and self._purpose == "batches":
            grad = groups[0].params[0].grad
            for b, a in enumerate(active):
                if a:
                    dp.clip_gradient_(grad[b][self.released_rows()], clip)

    def local_train(self, groups: list[Group], loss, data: ClientData, round_: int, cid: int, *,
                    purpose: str = "batches", epochs: int | None = None, inputs=None, penalty=None,
                    batch_size: int | None = None) -> float:
        """training.train for one client: its batches drawn by (seed, `purpose`, round, client) from
        `inputs(epoch, gen)` (default: its training features, augmented as data.augment says),
        `epochs` local epochs (default train.local_epochs), batches of `batch_size` (default
        train.batch_size). Returns the mean loss."""
        t = self.cfg.train
        self._purpose = purpose             # after_backward clips the round's training only
        gen = rng.torch_generator(self.cfg.seed, purpose, round_, cid)
        inputs = inputs or (lambda epoch, g: data.train_features(round_, epoch, g))
        return training.train(groups, loss, training.Batches(data.train_y, inputs, batch_size or t.batch_size, gen),
                              epochs or t.local_epochs, penalty=penalty, after_backward=self.after_backward,
                              where=f"round {round_ + 1}, client {cid}")

    def train_prompt(self, state, data: ClientData, round_: int, cid: int, *, logits=None, penalty=None,
                     others: tuple[Group, ...] = (), purpose: str = "batches", epochs: int | None = None) -> float:
        """CoOp's local training of `state.ctx` (local_train with the prompt's recipe and
        cross-entropy). logits(ctx_text (C, D), x) -> (B, C) logits (default: CLIP's); penalty(ctx)
        adds to the loss; `others` are groups trained with the prompt (stepped after it).
        Returns the mean loss (NaN for a client without training images)."""
        self._text.pop(cid, None)           # its prompt changes
        logits = logits or (lambda text, x: self.logit_scale * x @ text.t())
        ctx = state.ctx.clone().requires_grad_(True)
        loss = self.local_train([Group([ctx], self.recipe()), *others],
                                lambda x, y: F.cross_entropy(logits(self.train_encoder(ctx), x), y),
                                data, round_, cid, purpose=purpose, epochs=epochs,
                                penalty=None if penalty is None else (lambda: penalty(ctx)))
        state.ctx = ctx.detach()
        return loss

    def train_prompt_block(self, states: list, datas: list[ClientData], round_: int, cids: list[int], *,
                           logits=None, penalty=None, others: tuple[Group, ...] = (), purpose: str = "batches",
                           epochs: int | None = None) -> list[float]:
        """`train_prompt` for a block of clients in one batched computation: their prompts stacked
        (B, n_ctx, W), one text-encoder pass over B*C sequences per step (PromptEncoder.encode_block),
        the per-client cross-entropies summed (so each prompt's gradient is its own client's), one
        StackedSGD of the prompt's recipe; each client's batches drawn by (seed, `purpose`, round,
        client) as `local_train` draws them. logits(text (B, C, D), x (B, bs, D)) -> (B, bs, C)
        (default: CLIP's per client); penalty(ctx (B, n_ctx, W)) -> (B,); `others`: per-client groups
        (Group.client = the client's index in the block). Each client's result equals its
        `train_prompt` up to float rounding (docs/benchmarks.md states the tolerance)."""
        t = self.cfg.train
        for c in cids:
            self._text.pop(c, None)
        self._purpose = purpose
        logits = logits or (lambda text, x: self.logit_scale * torch.bmm(x, text.transpose(1, 2)))
        ctx = torch.stack([s.ctx for s in states]).requires_grad_(True)

        def loss(x, y, w):
            out = logits(self.train_encoder.encode_block(ctx), x)
            ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            return (ce.view(w.shape) * w).sum(1)

        batches = []
        for d, c in zip(datas, cids):
            gen = rng.torch_generator(self.cfg.seed, purpose, round_, c)
            batches.append(training.Batches(d.train_y, lambda epoch, g, d=d: d.train_features(round_, epoch, g),
                                            t.batch_size, gen))
        losses = training.train_block([Group([ctx], self.recipe()), *others], loss, batches,
                                      epochs or t.local_epochs,
                                      penalty=None if penalty is None else (lambda: penalty(ctx)),
                                      after_backward=self.after_backward_block,
                                      where=[f"round {round_ + 1}, client {c}" for c in cids])
        for b, s in enumerate(states):
            s.ctx = ctx[b].detach().clone()
        return losses

    @torch.no_grad()
    def score(self, data: ClientData, logits_fn, weights_sum: bool = False) -> EvalResult:
        """Accuracy, macro-F1 and loss of `logits_fn(x) -> (logits (B, C), gating weights (B, C, K) or None)`
        on the client's test split; with gating weights, logs their mean per expert as `gate_weight`."""
        preds, losses, weights = [], [], []
        bs = self.cfg.train.eval_batch_size
        for start in range(0, len(data.test_y), bs):
            x, y = data.test_x[start:start + bs], data.test_y[start:start + bs]
            logits, w = logits_fn(x)
            preds.append(logits.argmax(-1))
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            if w is not None:
                weights.append(w.sum(dim=(0, 1)) / w.shape[1])
        n = len(data.test_y)
        if n == 0:
            return EvalResult(float("nan"), float("nan"), float("nan"), correct=np.zeros(0, bool))
        pred = torch.cat(preds).cpu().numpy()
        true = data.test_y.cpu().numpy()
        res = EvalResult(float((pred == true).mean()), macro_f1(pred, true), float(sum(losses)) / n, pred == true)
        if weights:
            res.logs["gate_weight"] = (torch.stack(weights).sum(0) / n).cpu().numpy()
        return res


# ---------------------------------------------------------------------------- the method

class Method:
    """A method's implementation: its declarations and its two parts (`Server`, `Client` classes).
    What it is called, its options and data needs are its manifest (algorithms/manifest.py)."""
    Server: type[ServerPart] = ServerPart
    Client: type[ClientPart] = ClientPart

    def __init__(self, setup: Setup):
        self.setup, self.cfg = setup, setup.cfg
        self.options = setup.cfg.options      # the method's own options (its manifest's section), or None

    def arrays(self) -> Arrays:
        return Arrays()

    def logs(self) -> tuple[Log, ...]:
        return ()

    def server(self) -> ServerPart:
        return self.Server(self)

    def client(self) -> ClientPart:
        return self.Client(self)
