"""FedTPG (Qiu et al., ICLR 2024, "Text-driven Prompt Generation for Vision-Language Models in
Federated Learning"; authors' code boschresearch/FedTPG: model/prompt_net.py, model/FedTPG.py,
federated/server.py, federated/client.py).

No prompt travels: a prompt-generator network does. It turns the text embeddings of the class names
into the n_ctx context vectors of a CoOp prompt, so a new list of class names (unseen classes, another
data set) gets its own context from the same network:

    E      = the frozen CLIP's L2-normalised text features of the bare class names (C, D)
             (model/FedTPG.py FedTPG.forward: encode_text(tokenize(classname)), no template)
    ctx    = FF(x) + x,  x = MHA(LN(Q), LN_E(E), LN_E(E))              (n_ctx, W)
             Q: n_ctx learned queries (W wide); one cross-attention (model/prompt_net.py
             CrossAttention: no residual around it), then a GEGLU feed-forward with a residual,
             then `depth` self-attention blocks (default 0, the published scripts')
    text   = the CoOp prompt "[SOS] ctx <class name>." through the frozen text tower (C, D)

Only the input-level context is generated (the published scripts' D_CTX = 1). The server initialises
the network (the same draw on every run, keyed by the seed), sends it to the round's participants,
and FedAvgs their uploads; every client is evaluated with the new global network, which is the only
model FedTPG has (no personal part: `evaluate_global` is `evaluate`). A client keeps nothing between
rounds. What travels each way is the network's parameters, one flat float32 row (plus the sample
count, not under DP): nothing in it depends on the classes.

Its local training is the shared routine (ClientPart.local_train) over the one flat parameter
vector (so DP's per-step gradient clip covers the whole network), with the authors' SGD settings:
options [fedtpg] (see its __init__.py for their sources).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ... import dp, rng
from ...errors import PFedMoAPError
from ...exchange import Array, Broadcast
from ..base import Arrays, ClientPart, Method, PromptState, ServerPart, fedavg, sample_count_array, sample_counts
from ..training import Group, Recipe


# ---------------------------------------------------------------------------- the generator

class PromptGenerator:
    """The network of model/prompt_net.py PromptTranslator (prompt_depth 1) as a pure function of
    one flat float32 parameter vector: `init(gen)` draws one, `self(flat, E)` generates.

    width W: the text tower's token width (the context vectors'); text_dim D: the class embeddings'."""

    def __init__(self, n_ctx: int, width: int, text_dim: int, heads: int = 4, depth: int = 0, ff_mult: int = 4):
        if width % heads:
            raise PFedMoAPError(f"fedtpg.heads = {heads}: must divide the text tower's width {width}")
        self.n_ctx, self.W, self.D, self.heads, self.depth, self.mult = n_ctx, width, text_dim, heads, depth, ff_mult
        W, D = width, text_dim
        shapes = [("queries", (n_ctx, W)), ("cross.ln_q.w", (W,)), ("cross.ln_q.b", (W,)),
                  ("cross.ln_kv.w", (D,)), ("cross.ln_kv.b", (D,)), *self._attention_shapes("cross", D),
                  *self._ff_shapes("cross")]
        for i in range(depth):
            shapes += [(f"self{i}.ln.w", (W,)), (f"self{i}.ln.b", (W,)), *self._attention_shapes(f"self{i}", W),
                       *self._ff_shapes(f"self{i}")]
        self.shapes = dict(shapes)
        self.offsets, n = {}, 0
        for name, shape in shapes:
            self.offsets[name] = n
            n += math.prod(shape)
        self.size = n

    def _attention_shapes(self, p: str, kv_dim: int):
        W = self.W
        return [(f"{p}.q.w", (W, W)), (f"{p}.k.w", (W, kv_dim)), (f"{p}.v.w", (W, kv_dim)), (f"{p}.qkv.b", (3 * W,)),
                (f"{p}.out.w", (W, W)), (f"{p}.out.b", (W,))]

    def _ff_shapes(self, p: str):
        W, M = self.W, self.mult * self.W
        return [(f"{p}.ff.ln.w", (W,)), (f"{p}.ff.ln.b", (W,)), (f"{p}.ff.in.w", (2 * M, W)), (f"{p}.ff.in.b", (2 * M,)),
                (f"{p}.ff.out.w", (W, M)), (f"{p}.ff.out.b", (W,))]

    # -------------------------------------------------------------- parameters
    def init(self, gen: torch.Generator) -> torch.Tensor:
        """A fresh network, drawn as torch initialises the authors' modules: queries N(0, 0.02^2);
        LayerNorms 1 / 0; nn.MultiheadAttention's q/k/v weights Xavier-uniform (one (3W, W) matrix
        when the keys are W wide, else each its own), its biases 0, its output weight as nn.Linear's;
        nn.Linear weights and biases U(+-1/sqrt(fan_in))."""
        flat = torch.empty(self.size)
        p = self.unflatten(flat)

        def uniform(t, bound):
            t.copy_(torch.rand(t.shape, generator=gen) * (2 * bound) - bound)

        def linear(prefix, fan_in):
            uniform(p[prefix + ".w"], 1 / math.sqrt(fan_in))
            uniform(p[prefix + ".b"], 1 / math.sqrt(fan_in))

        def attention(prefix, kv_dim):
            W = self.W
            if kv_dim == W:        # packed in_proj_weight (3W, W)
                qkv = torch.empty(3 * W, W)
                uniform(qkv, math.sqrt(6 / (4 * W)))
                for j, k in enumerate("qkv"):
                    p[f"{prefix}.{k}.w"].copy_(qkv[j * W:(j + 1) * W])
            else:                  # q_proj_weight, k_proj_weight, v_proj_weight
                uniform(p[f"{prefix}.q.w"], math.sqrt(6 / (2 * W)))
                uniform(p[f"{prefix}.k.w"], math.sqrt(6 / (W + kv_dim)))
                uniform(p[f"{prefix}.v.w"], math.sqrt(6 / (W + kv_dim)))
            p[f"{prefix}.qkv.b"].zero_()
            uniform(p[f"{prefix}.out.w"], 1 / math.sqrt(W))
            p[f"{prefix}.out.b"].zero_()

        def ff(prefix):
            p[f"{prefix}.ff.ln.w"].fill_(1)
            p[f"{prefix}.ff.ln.b"].zero_()
            linear(f"{prefix}.ff.in", self.W)
            linear(f"{prefix}.ff.out", self.mult * self.W)

        with torch.no_grad():
            p["queries"].copy_(torch.randn(self.n_ctx, self.W, generator=gen) * 0.02)
            for name in ("cross.ln_q", "cross.ln_kv"):
                p[name + ".w"].fill_(1)
                p[name + ".b"].zero_()
            attention("cross", self.D)
            ff("cross")
            for i in range(self.depth):
                p[f"self{i}.ln.w"].fill_(1)
                p[f"self{i}.ln.b"].zero_()
                attention(f"self{i}", self.W)
                ff(f"self{i}")
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat vector, one per parameter (gradients flow back into `flat`)."""
        return {k: flat[o:o + math.prod(self.shapes[k])].view(self.shapes[k]) for k, o in self.offsets.items()}

    # -------------------------------------------------------------- forward
    def _attend(self, p, prefix: str, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        """nn.MultiheadAttention (no dropout) of one sequence: q_in (L, W) over kv_in (S, kv_dim)."""
        W, H = self.W, self.heads
        b = p[f"{prefix}.qkv.b"]
        q = F.linear(q_in, p[f"{prefix}.q.w"], b[:W]).view(-1, H, W // H).transpose(0, 1)
        k = F.linear(kv_in, p[f"{prefix}.k.w"], b[W:2 * W]).view(-1, H, W // H).transpose(0, 1)
        v = F.linear(kv_in, p[f"{prefix}.v.w"], b[2 * W:]).view(-1, H, W // H).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(W // H), dim=-1)
        return F.linear((att @ v).transpose(0, 1).reshape(-1, W), p[f"{prefix}.out.w"], p[f"{prefix}.out.b"])

    def _ff(self, p, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """FeedForward: LayerNorm, Linear(W, 2 mult W), GEGLU, Linear(mult W, W)."""
        h = F.layer_norm(x, (self.W,), p[f"{prefix}.ff.ln.w"], p[f"{prefix}.ff.ln.b"])
        h, gates = F.linear(h, p[f"{prefix}.ff.in.w"], p[f"{prefix}.ff.in.b"]).chunk(2, dim=-1)
        return F.linear(h * F.gelu(gates), p[f"{prefix}.ff.out.w"], p[f"{prefix}.ff.out.b"])

    def __call__(self, flat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """flat (size,) parameters, emb (C, D) class embeddings -> the context (n_ctx, W)."""
        p = self.unflatten(flat)
        q = F.layer_norm(p["queries"], (self.W,), p["cross.ln_q.w"], p["cross.ln_q.b"])
        kv = F.layer_norm(emb, (self.D,), p["cross.ln_kv.w"], p["cross.ln_kv.b"])
        x = self._attend(p, "cross", q, kv)                 # no residual (prompt_net.py CrossAttention)
        x = self._ff(p, "cross", x) + x
        for i in range(self.depth):
            h = F.layer_norm(x, (self.W,), p[f"self{i}.ln.w"], p[f"self{i}.ln.b"])
            x = self._attend(p, f"self{i}", h, h) + x
            x = self._ff(p, f"self{i}", x) + x
        return x


def generator_of(setup, options) -> PromptGenerator:
    n_ctx, width = setup.ctx_shape
    return PromptGenerator(n_ctx, width, setup.backbone.embed_dim, options.heads, options.depth, options.ff_mult)


def cosine_lr(lr: float, round_: int, rounds: int) -> float:
    """The learning rate of round `round_` (0-based): CosineAnnealingLR over the run's rounds,
    stepped once a round (federated/client.py Client.train -> update_lr)."""
    return 0.5 * lr * (1 + math.cos(math.pi * round_ / rounds))


# ---------------------------------------------------------------------------- the parts

def _mask(n: int, ids) -> np.ndarray:
    m = np.zeros(n, bool)
    m[np.asarray(ids, np.int64)] = True
    return m


class Server(ServerPart):
    """Keeps the global generator: draws it once (federated/server.py: the server's network is
    what the first round distributes), sends it to the participants, FedAvgs their uploads and
    sends the result to the evaluated clients."""

    def __init__(self, method):
        super().__init__(method)
        gen = rng.torch_generator(self.cfg.seed, "fedtpg-init")
        self.generator = method.generator.init(gen).numpy().astype(np.float32)

    def configure_fit(self, round_, participants):
        return {"global_generator": Broadcast(self.generator, _mask(self.n_clients, participants))}

    def aggregate_fit(self, round_, participants, uploads):
        if len(uploads["generator"]):
            counts = sample_counts(uploads) if self.options.aggregation == "samples" else None
            self.generator = fedavg(uploads["generator"], counts)

    def configure_evaluate(self, round_, evaluated):
        return {"global_generator": Broadcast(self.generator, np.asarray(evaluated, bool))}

    def state_dict(self):
        return {"generator": self.generator}

    def load_state_dict(self, state):
        self.generator = np.array(state["generator"], np.float32)


class Client(ClientPart):
    """Trains the downloaded network on its images (nothing kept between rounds) and is evaluated
    with the global one, on the class names of its encoder."""

    def __init__(self, method):
        super().__init__(method)
        self.generator: PromptGenerator = method.generator
        self._emb: torch.Tensor | None = None                     # (C, D) class-name embeddings
        self._global: tuple[np.ndarray, torch.Tensor] | None = None   # (global row, its text features)

    def init_state(self, cid: int) -> PromptState:
        return PromptState(ctx=torch.zeros(0))      # no personal part

    # -------------------------------------------------------------- text
    def class_embeddings(self) -> torch.Tensor:
        """The frozen CLIP's text features of this client part's class names (its encoder's), bare
        (model/FedTPG.py: no template, "_" read as a space); once per client part."""
        if self._emb is None:
            names = [n.replace("_", " ") for n in self.encoder.classnames]
            self._emb = self.encoder.backbone.encode_texts(names).float().cpu()
        return self._emb

    def context(self, flat: torch.Tensor) -> torch.Tensor:
        """The context the network `flat` generates for this client part's classes (n_ctx, W)."""
        return self.generator(flat, self.class_embeddings())

    def text(self, row: np.ndarray) -> torch.Tensor:
        """(C, D) text features of the network `row` (cached: every client evaluates the same one)."""
        if self._global is None or not np.array_equal(self._global[0], row):
            with torch.no_grad():
                flat = torch.from_numpy(np.array(row, np.float32))
                self._global = (np.array(row, np.float32), self.encoder(self.context(flat)))
        return self._global[1]

    # -------------------------------------------------------------- training
    def recipe_at(self, round_: int) -> Recipe:
        o = self.options
        return Recipe(lr=cosine_lr(o.lr, round_, self.cfg.rounds), momentum=o.momentum,
                      weight_decay=o.weight_decay, schedule="constant")

    def recipe(self) -> Recipe:
        return self.recipe_at(0)

    def step_lrs(self, n: int, round_: int = 0) -> list[float]:
        """The learning rate of each local step of round `round_` for a client with n images."""
        if n == 0:
            return []
        t, o = self.cfg.train, self.options
        per_epoch = n // min(o.batch_size or t.batch_size, n)
        return [self.recipe_at(round_).lr] * ((o.local_epochs or t.local_epochs) * per_epoch)

    def upload_sensitivity(self, n: int) -> float:
        """S / C: the largest over the rounds (the learning rate changes by round)."""
        o = self.options
        return max(dp.gradient_sensitivity(self.step_lrs(n, r), o.momentum, o.weight_decay)
                   for r in range(self.cfg.rounds))

    def fit(self, state, data, round_, cid, down):
        net = torch.from_numpy(np.array(down["global_generator"], np.float32)).requires_grad_(True)
        emb, o = self.class_embeddings(), self.options

        def loss(x, y):
            text = self.encoder(self.generator(net, emb))
            return F.cross_entropy(self.logit_scale * x @ text.t(), y)

        self.local_train([Group([net], self.recipe_at(round_))], loss, data, round_, cid,
                         epochs=o.local_epochs or None, batch_size=o.batch_size or None)
        counts = self.upload_count(data) if self.options.aggregation == "samples" else {}
        return {"generator": self.upload_prompt(net.detach(), round_, cid), **counts}

    # -------------------------------------------------------------- evaluation
    def evaluate(self, state, data, round_, cid, down):
        text = self.text(down["global_generator"])
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))

    def evaluate_global(self, state, data, round_, cid, down):
        """The global network is FedTPG's only model: the same as `evaluate`."""
        return self.evaluate(state, data, round_, cid, down)


class FedTPG(Method):
    """A prompt-generator network shared by every client, FedAvg'd (FedTPG, Qiu et al. 2024)."""
    Server, Client = Server, Client

    def __init__(self, setup):
        super().__init__(setup)
        self.generator = generator_of(setup, self.options)

    def arrays(self):
        P = self.generator.size
        g = Array("global_generator", P, broadcast=True)
        counts = sample_count_array(self.cfg) if self.options.aggregation == "samples" else ()
        return Arrays(fit_down=(g,), up=(Array("generator", P), *counts), eval_down=(g,))
