"""pFedMMA (Ghiasvand, Alizadeh, Pedarsani, ICLR 2026, "Personalized Federated Fine-Tuning with
Multi-Modal Adapter for Vision-Language Models"; reference code sajjad-ucsb/pFedMMA,
trainers/pFedMMA.py and federated_main.py, on MMA, Yang et al., CVPR 2024, ZjjConan/Multi-Modal-Adapter
clip/model.py).

Every client holds multi-modal adapters in the last `pfedmma.n_layers` residual blocks of both
CLIP towers. In block i of a tower, with x the block's input,

    out_i = block_i(x) + s * up_t(relu(shared_j(relu(down_t(ln_1(x))))))

with down_t: W_t -> dim (then ReLU), shared_j: dim -> dim (then ReLU), up_t: dim -> W_t, s =
`pfedmma.scale`; down and up are per tower and layer, the shared projection j is one per depth
below the top and is used by both towers' blocks at that depth (the reference: the same layer
index, equal for towers of equal depth). As MMA, the adapter's branch scales its gradient so that
its parameters learn as if s were 1 (`gradient_scale`). The text tower encodes the fixed
"a photo of a <class>." (no learnable context); the logits are CLIP's, between the adapted image
and text features. Everything trains with one SGD (constant lr, momentum, weight decay).

What travels: only the shared projections (`shared`, uploaded with the sample count; FedAvg over
the participants). The towers' down and up projections never leave the client. Round 0 trains
every client (`all_clients_first_round`), from one common initialisation; after a round the new
shared projections go to every client: evaluated with them and its own modality-specific
adapters; participants start the next training from them (the reference writes them into every
client's weights after each round; here a client takes them when it next trains, which is the
same, and evaluation changes no client state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ... import rng
from ...clip import adapters
from ...clip.prompt import PromptEncoder, context_length, init_context
from ...exchange import Array, Broadcast
from ..base import Arrays, ClientPart, Method, ServerPart, fedavg, sample_count_array, sample_counts
from ..training import Group, Recipe


class _GradientScale(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward (MMA's gradient_scale_layer)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gradient_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradientScale.apply(x, scale)


@dataclass
class Tower:
    """The adapted blocks of one tower: width, depth, and how many of its last blocks are adapted."""
    width: int
    depth: int
    k: int


@dataclass
class State:
    """A client's adapters, one row per adapted block, counted from the top (row 0: the last block)."""
    shared: torch.Tensor        # (S, dim*dim + dim): the shared projections, the only part that travels
    text: torch.Tensor          # (k_text, 2*dim*W + dim + W): the text tower's down (dim, W) and up (W, dim), with biases
    image: torch.Tensor         # (k_image, ...): the image tower's, likewise


class Server(ServerPart):
    """Keeps the FedAvg of the shared projections; sends it to the participants before training and
    to every client before evaluation. Round 0 may train every client."""

    def __init__(self, method):
        super().__init__(method)
        self.shared: np.ndarray | None = None

    def participants(self, round_):
        if round_ == 0 and self.options.all_clients_first_round:
            return np.arange(self.n_clients)
        return super().participants(round_)

    def configure_fit(self, round_, participants):
        if self.shared is None:
            return {}
        to = np.zeros(self.n_clients, bool)
        to[participants] = True
        return {"global_shared": Broadcast(self.shared, to)}

    def aggregate_fit(self, round_, participants, uploads):
        if len(participants):
            self.shared = fedavg(uploads["shared"], sample_counts(uploads))

    def configure_evaluate(self, round_, evaluated):
        if self.shared is None:
            return {}
        return {"global_shared": Broadcast(self.shared, np.ones(self.n_clients, bool))}

    def state_dict(self):
        return {"shared": np.zeros(0, np.float32) if self.shared is None else self.shared}

    def load_state_dict(self, state):
        s = state["shared"]
        self.shared = np.array(s, np.float32) if len(s) else None


class Client(ClientPart):
    def __init__(self, method):
        super().__init__(method)
        m, o = method, self.options
        self.text_tower, self.image_tower, self.dim = m.text_tower, m.image_tower, o.dim
        # the fixed text "a photo of a <class>.": the words' embeddings as a frozen context, for the
        # class names of this part's encoder (so another class list is another part's encoder)
        n = context_length(0, o.text, self.backbone)
        self.words = init_context(self.backbone, n, o.text, torch.Generator())
        self.text_encoder = PromptEncoder(self.backbone, self.encoder.classnames, n,
                                          truncate=self.cfg.run.truncate_eos, shared_prefix=self.cfg.run.shared_prefix)

    # -------------------------------------------------------------- state
    def init_state(self, cid: int) -> State:
        # One initialisation for every client (the reference copies one model to all): Kaiming
        # normal (fan_out, ReLU) weights and zero biases, as MMA's _build_adapter.
        gen = rng.torch_generator(self.cfg.seed, "pfedmma-init")
        d = self.dim

        def linear(out_f, in_f):
            return torch.cat([(torch.randn(out_f, in_f, generator=gen) * math.sqrt(2.0 / out_f)).reshape(-1),
                              torch.zeros(out_f)])

        def tower(t: Tower):
            return torch.stack([torch.cat([linear(d, t.width), linear(t.width, d)]) for _ in range(t.k)])

        shared = torch.stack([linear(d, d) for _ in range(self.method.n_shared)])
        return State(shared=shared, text=tower(self.text_tower), image=tower(self.image_tower))

    def state_tensors(self, state: State) -> list[torch.Tensor]:
        return [state.shared, state.text, state.image]

    def released_rows(self):
        return slice(None)                  # the first group's tensor is the shared projections

    def recipe(self) -> Recipe:
        o = self.options
        return Recipe(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, schedule="constant")

    # -------------------------------------------------------------- the adapted towers
    def hook(self, tower: Tower, rows: torch.Tensor, shared: torch.Tensor):
        """The per-block hook (clip/adapters.py) adding the adapters `rows` of `tower`."""
        d, W, s = self.dim, tower.width, self.options.scale

        def add(i, block, x_in, x_out):
            j = tower.depth - 1 - i                     # depth below the top
            if j >= tower.k:
                return x_out
            y = block.ln_1(gradient_scale(x_in, s))
            r, sh = rows[j].to(y.device, y.dtype), shared[j].to(y.device, y.dtype)   # the state lives on the CPU
            a = d * W + d
            down_w, down_b, up_w, up_b = r[:d * W].view(d, W), r[d * W:a], r[a:a + W * d].view(W, d), r[a + W * d:]
            y = F.relu(F.linear(y, down_w, down_b))
            y = F.relu(F.linear(y, sh[:d * d].view(d, d), sh[d * d:]))
            y = F.linear(y, up_w, up_b) * s
            return x_out + gradient_scale(y, 1.0 / s)
        return add

    def text_features(self, shared: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(C, D) L2-normalised text features of this part's classes through the adapted text tower."""
        return self.text_encoder(self.words, hook=self.hook(self.text_tower, text, shared))

    def image_features(self, shared: torch.Tensor, image: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> (B, D) through the adapted image tower."""
        return adapters.encode_image(self.backbone, x, hook=self.hook(self.image_tower, image, shared))

    def logits(self, shared, text, image, x) -> torch.Tensor:
        return self.logit_scale * self.image_features(shared, image, x) @ self.text_features(shared, text).t()

    def _shared_of(self, state: State, down) -> torch.Tensor:
        if "global_shared" in down:
            return torch.from_numpy(np.array(down["global_shared"], np.float32)).reshape(state.shared.shape)
        return state.shared

    # -------------------------------------------------------------- a round
    def fit(self, state: State, data, round_, cid, down):
        state.shared = self._shared_of(state, down)
        if data.images is None:
            raise RuntimeError("pfedmma trains inside the image tower: it needs its manifest's DataNeeds(images=True)")
        shared, text, image = (t.clone().requires_grad_(True) for t in (state.shared, state.text, state.image))
        r = self.recipe()
        self.local_train([Group([shared], r), Group([text, image], r)],
                         lambda x, y: F.cross_entropy(self.logits(shared, text, image, x), y),
                         data, round_, cid, inputs=lambda epoch, gen: data.images.train(round_, epoch, gen))
        state.shared, state.text, state.image = shared.detach(), text.detach(), image.detach()
        return {"shared": self.upload_prompt(state.shared, round_, cid), **self.upload_count(data)}

    @torch.no_grad()
    def evaluate(self, state: State, data, round_, cid, down):
        shared = self._shared_of(state, down)
        text = self.text_features(shared, state.text)
        return self.score(replace(data, test_x=data.images.test),
                          lambda x: (self.logit_scale * self.image_features(shared, state.image, x) @ text.t(), None))


class PFedMMA(Method):
    """Multi-modal adapters in both towers; FedAvg of their shared projections only (pFedMMA)."""
    Server, Client = Server, Client

    def __init__(self, setup):
        super().__init__(setup)
        b, n = setup.backbone, self.options.n_layers
        adapters.check_vit(b, "algorithm = 'pfedmma'")
        from ...clip.prompt import _text_tower
        text, visual = _text_tower(b.model), b.model.visual
        td, vd = adapters.depth(text.transformer), adapters.depth(visual.transformer)
        self.text_tower = Tower(text.token_embedding.weight.shape[1], td, min(n, td))
        self.image_tower = Tower(visual.transformer.width, vd, min(n, vd))
        self.n_shared = max(self.text_tower.k, self.image_tower.k)
        self.shared_size = self.n_shared * (self.options.dim ** 2 + self.options.dim)

    def arrays(self) -> Arrays:
        g = Array("global_shared", self.shared_size, broadcast=True)
        return Arrays(fit_down=(g,), up=(Array("shared", self.shared_size), *sample_count_array(self.cfg)),
                      eval_down=(g,))
