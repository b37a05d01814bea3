"""CoOp prompts spliced into open_clip's text path.

Class c's prompt is `[SOS] ctx_1..ctx_n <classname c> . [EOS]`. A prompt is just its context tensor
`ctx` (n_ctx, W); the `PromptEncoder` (one per rank and class list) turns any ctx into the C text
features, exactly as `encode_text` would, with two exact shortcuts:
- EOS truncation: the text transformer is causal, so the EOS output only depends on the tokens up
  to it; the sequence is cut after the last EOS of all classes.
- shared prefix: `[SOS] + ctx` is identical in every class's sequence, so its hidden states are too;
  they are computed once and every class's short suffix attends to their keys and values.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PFedMoAPError

log = logging.getLogger(__name__)


def _text_tower(model: nn.Module) -> nn.Module:
    tower = model.text if hasattr(model, "text") else model
    for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        if not hasattr(tower, attr):
            raise PFedMoAPError(f"model: its text tower ({type(tower).__name__}) is not an open_clip "
                                "transformer text tower; CoOp prompts need token embeddings")
    return tower


def init_context(backbone, n_ctx: int, phrase: str, generator: torch.Generator) -> torch.Tensor:
    """A fresh context: N(0, 0.02^2), or the word embeddings of `phrase` (then n_ctx = its length)."""
    tower = _text_tower(backbone.model)
    width = tower.token_embedding.weight.shape[1]
    if phrase:
        tokens = backbone.tokenizer([phrase])[0]
        n = int(tokens.argmax()) - 1                      # between SOS and EOS
        with torch.no_grad():
            emb = tower.token_embedding(tokens[1:1 + n].to(tower.token_embedding.weight.device))
        return emb.detach().float().cpu().clone()
    return torch.randn(n_ctx, width, generator=generator) * 0.02


def context_length(n_ctx: int, phrase: str, backbone) -> int:
    if not phrase:
        return n_ctx
    return int(backbone.tokenizer([phrase])[0].argmax()) - 1


class PromptEncoder:
    """Text features of CoOp prompts for one list of class names (frozen tower, no parameters)."""

    def __init__(self, backbone, classnames: list[str], n_ctx: int,
                 truncate: bool = True, shared_prefix: bool = True, cuda_graph: bool = False):
        self.backbone = backbone
        self.tower = _text_tower(backbone.model)
        self.n_ctx = n_ctx
        self.classnames = list(classnames)
        dev = self.tower.token_embedding.weight.device
        texts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
        tokens = backbone.tokenizer(texts).to(dev)
        self.eos = tokens.argmax(dim=-1)                  # EOT has the highest id in open_clip's vocabulary
        if (tokens[:, -1] != 0).any():    # the tokenizer cut a prompt short (EOT forced into the last slot)
            raise PFedMoAPError(f"prompt.n_ctx = {n_ctx}: prompts do not fit the text context length "
                                f"{tokens.shape[1]}")
        length = int(self.eos.max()) + 1 if truncate else tokens.shape[1]
        with torch.no_grad():
            emb = self.tower.token_embedding(tokens[:, :length])
        self.sos = emb[:1, :1]                            # (1, 1, W), the same for every class
        self.suffix = emb[:, 1 + n_ctx:]                  # (C, L-1-n, W): class name, '.', EOS, padding
        self.length = length
        blocks = self.tower.transformer.resblocks
        from open_clip.transformer import ResidualAttentionBlock
        self.shared_prefix = shared_prefix and all(type(b) is ResidualAttentionBlock for b in blocks)
        self.cast = self.tower.transformer.get_cast_dtype()
        # run.cuda_graph: the differentiable text pass of each block shape captured once in a CUDA
        # graph (forward and backward replayed with one launch each); a GPU step is bound by kernel
        # launches. Off on the CPU; any capture failure falls back to the eager pass, logged once.
        self.cuda_graph = cuda_graph and dev.type == "cuda"
        self._graphs: dict[tuple, object] = {}
        if cuda_graph and dev.type != "cuda":
            log.warning("run.cuda_graph = true: the model is on %s, not CUDA; the text step runs eagerly", dev)

    @property
    def n_classes(self) -> int:
        return self.suffix.shape[0]

    def __call__(self, ctx: torch.Tensor, hook=None) -> torch.Tensor:
        """ctx (n_ctx, W) -> L2-normalised text features (C, D); differentiable w.r.t. ctx.

        `hook(i, block, x_in, x_out)`, when given, is called after every residual block i and returns
        the next block's input (per-token adapters, clip/adapters.py); both fast paths stay exact
        for a hook that acts on each token alone."""
        if hook is None and self._graph_for(ctx):
            return self._graphed(ctx.unsqueeze(0))[0]
        ctx = ctx.to(self.sos.device, self.cast)
        with self.backbone.autocast():
            x = self._encode_shared(ctx, hook) if self.shared_prefix else self._encode_full(ctx, hook)
        return F.normalize(x.float(), dim=-1)

    def _project(self, eos_states: torch.Tensor) -> torch.Tensor:
        x = self.tower.ln_final(eos_states)
        proj = self.tower.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _mask(self) -> torch.Tensor:
        return self.tower.attn_mask[:self.length, :self.length].to(self.sos.device)

    def _encode_full(self, ctx: torch.Tensor, hook=None) -> torch.Tensor:
        C = self.n_classes
        x = torch.cat([self.sos.expand(C, -1, -1), ctx.unsqueeze(0).expand(C, -1, -1), self.suffix], dim=1)
        x = x + self.tower.positional_embedding[:self.length].to(x.dtype)
        if hook is None:
            x = self.tower.transformer(x, attn_mask=self._mask())
        else:
            from .adapters import run_blocks
            x = run_blocks(self.tower.transformer, x, hook, attn_mask=self._mask())
        return self._project(x[torch.arange(C), self.eos])

    def _encode_shared(self, ctx: torch.Tensor, hook=None) -> torch.Tensor:
        C, p = self.n_classes, 1 + self.n_ctx
        pos = self.tower.positional_embedding[:self.length].to(ctx.dtype)
        prefix = torch.cat([self.sos[0], ctx], dim=0).unsqueeze(0) + pos[:p]     # (1, p, W)
        suffix = self.suffix + pos[p:]                                           # (C, s, W)
        mask = self._mask()
        for i, block in enumerate(self.tower.transformer.resblocks):
            prefix_in, suffix_in = prefix, suffix
            h_pre = block.ln_1(prefix)
            h_suf = block.ln_1(suffix)
            # The prefix attends only to itself (causal), exactly as inside every class's sequence.
            prefix = prefix + block.ls_1(block.attn(h_pre, h_pre, h_pre, need_weights=False,
                                                    attn_mask=mask[:p, :p].to(h_pre.dtype))[0])
            prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
            kv = torch.cat([h_pre.expand(C, -1, -1), h_suf], dim=1)
            suffix = suffix + block.ls_1(block.attn(h_suf, kv, kv, need_weights=False,
                                                    attn_mask=mask[p:, :].to(h_suf.dtype))[0])
            suffix = suffix + block.ls_2(block.mlp(block.ln_2(suffix)))
            if hook is not None:
                prefix, suffix = hook(i, block, prefix_in, prefix), hook(i, block, suffix_in, suffix)
        return self._project(suffix[torch.arange(C), self.eos - p])

    def encode_block(self, ctxs: torch.Tensor) -> torch.Tensor:
        """A block of B clients' contexts (B, n_ctx, W) -> their text features (B, C, D) in one pass over
        B*C sequences; differentiable w.r.t. ctxs. Client b's features are `self(ctxs[b])`'s math (the
        same ops on its rows), equal to them up to float rounding of the larger matrix products."""
        if self._graph_for(ctxs):
            return self._graphed(ctxs)
        return self._encode_block(ctxs)

    def _graph_for(self, ctx: torch.Tensor) -> bool:
        return self.cuda_graph and torch.is_grad_enabled() and ctx.requires_grad

    def _graphed(self, ctxs: torch.Tensor) -> torch.Tensor:
        """encode_block through the CUDA graph of its shape (captured on first use)."""
        ctxs = ctxs.to(self.sos.device)
        fn = self._graphs.get(tuple(ctxs.shape))
        if fn is None:
            try:
                sample = ctxs.detach().clone().requires_grad_(True)
                fn = torch.cuda.make_graphed_callables(self._encode_block, (sample,))
            except Exception as e:      # unsupported here (driver, autocast, an op): run eagerly
                log.warning("run.cuda_graph: capturing the text step failed (%s: %s); it runs eagerly",
                            type(e).__name__, (str(e).splitlines() or [""])[0])
                self.cuda_graph = False
                return self._encode_block(ctxs)
            self._graphs[tuple(ctxs.shape)] = fn
        return fn(ctxs)

    def _encode_block(self, ctxs: torch.Tensor) -> torch.Tensor:
        B, C = ctxs.shape[0], self.n_classes
        ctxs = ctxs.to(self.sos.device, self.cast)
        # a CUDA graph's capture needs autocast without its cast cache (torch.cuda.make_graphed_callables)
        with self.backbone.autocast(cache=not self.cuda_graph):
            x = self._encode_shared_block(ctxs) if self.shared_prefix else self._encode_full_block(ctxs)
        return F.normalize(x.float(), dim=-1).reshape(B, C, -1)

    def _encode_full_block(self, ctxs: torch.Tensor) -> torch.Tensor:
        (B, n, W), C = ctxs.shape, self.n_classes
        x = torch.cat([self.sos.expand(B * C, -1, -1),
                       ctxs.unsqueeze(1).expand(B, C, n, W).reshape(B * C, n, W),
                       self.suffix.repeat(B, 1, 1)], dim=1)
        x = x + self.tower.positional_embedding[:self.length].to(x.dtype)
        x = self.tower.transformer(x, attn_mask=self._mask())
        return self._project(x[torch.arange(B * C, device=x.device), self.eos.repeat(B)])

    def _encode_shared_block(self, ctxs: torch.Tensor) -> torch.Tensor:
        (B, n, W), C, p = ctxs.shape, self.n_classes, 1 + self.n_ctx
        pos = self.tower.positional_embedding[:self.length].to(ctxs.dtype)
        prefix = torch.cat([self.sos.expand(B, -1, -1), ctxs], dim=1) + pos[:p]      # (B, p, W)
        suffix = (self.suffix + pos[p:]).repeat(B, 1, 1)                              # (B*C, s, W)
        mask = self._mask()
        for block in self.tower.transformer.resblocks:
            h_pre = block.ln_1(prefix)
            h_suf = block.ln_1(suffix)
            prefix = prefix + block.ls_1(block.attn(h_pre, h_pre, h_pre, need_weights=False,
                                                    attn_mask=mask[:p, :p].to(h_pre.dtype))[0])
            prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
            # each class sequence of client b attends to client b's prefix
            kv = torch.cat([h_pre.unsqueeze(1).expand(B, C, p, W).reshape(B * C, p, W), h_suf], dim=1)
            suffix = suffix + block.ls_1(block.attn(h_suf, kv, kv, need_weights=False,
                                                    attn_mask=mask[p:, :].to(h_suf.dtype))[0])
            suffix = suffix + block.ls_2(block.mlp(block.ln_2(suffix)))
        return self._project(suffix[torch.arange(B * C, device=suffix.device), (self.eos - p).repeat(B)])

    @torch.no_grad()
    def encode_frozen(self, ctxs: torch.Tensor) -> torch.Tensor:
        """Several contexts (E, n_ctx, W) -> (E, C, D) with no graph: experts and evaluation.

        One prompt at a time on purpose: results then never depend on how many prompts a rank
        encodes together, so they are identical at any number of ranks."""
        return torch.stack([self(c) for c in ctxs]) if len(ctxs) else ctxs.new_zeros(0, self.n_classes, 0)
