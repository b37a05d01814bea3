"""PromptFL+FT: PromptFL, then every client fine-tunes the global prompt locally before it is
evaluated: the "PromptFL+FT" baseline of pFedMoAP's tables (Luo et al., ICLR 2025, after FedOTP,
Li et al., CVPR 2024); local fine-tuning of the federated model as personalisation: Wang et al. 2019,
"Federated evaluation of on-device personalization"; Cheng et al. 2021, "Fine-tuning is fine in
federated learning".

When: every round, every evaluated client (the round loop evaluates every client) copies the new
global prompt and fine-tunes the copy for `promptfl_ft.epochs` local epochs (0 = train.local_epochs)
on its own training images, with CoOp's optimiser and schedule, then is evaluated with it. The
accuracy of round r is thus "PromptFL stopped after round r, plus local fine-tuning".

What it does not change: the federation. The fine-tuned copy is discarded after evaluation: never
uploaded, never kept in the client's state (so checkpoints hold what PromptFL's hold), and the
upload is the prompt trained from the global one, exactly as in `promptfl` — the global prompts of
a promptfl_ft run equal those of a promptfl run with the same config. Its batches are keyed draws
with their own purpose ("finetune", round, client), so they neither repeat the training batches nor
depend on the number of ranks.

Cost: N clients x `epochs` epochs of extra local training per round, on top of PromptFL's.
"""
from __future__ import annotations

import torch

from ..base import PromptState
from ..coop.method import PromptFL, PromptFLClient


class Client(PromptFLClient):
    """PromptFL's client; evaluated with a locally fine-tuned copy of the global prompt."""
    block_training = True         # the fine-tuning of a block is batched (evaluate_block)

    def epochs(self) -> int:
        return self.options.epochs or self.cfg.train.local_epochs

    def finetune(self, global_ctx: torch.Tensor, data, round_: int, cid: int) -> torch.Tensor:
        """A fine-tuned copy of `global_ctx` (n_ctx, W): CoOp's local training (train_prompt: the
        training's recipe, warm-up then cosine over `epochs()` epochs) with batches (and augmented
        views) drawn by (seed, "finetune", round, client). A client without training images gets
        the global prompt back."""
        copy = PromptState(ctx=global_ctx.clone())
        self.train_prompt(copy, data, round_, cid, purpose="finetune", epochs=self.epochs())
        return copy.ctx

    def evaluate_global(self, state, data, round_, cid, down):
        """The global model: the global prompt before any fine-tuning (PromptFL's)."""
        return self.with_global_prompt(data, round_, down)

    def evaluate(self, state, data, round_, cid, down):
        ctx = self.finetune(self.prompt(down["global_prompt"]), data, round_, cid)
        with torch.no_grad():
            text = self.encoder(ctx)
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


    def evaluate_block(self, states, datas, round_, cids, downs):
        """The block's fine-tuning batched (train_prompt_block, purpose "finetune"), then each
        client scored with its fine-tuned copy."""
        if len(cids) == 1:
            return super().evaluate_block(states, datas, round_, cids, downs)
        copies = [PromptState(ctx=self.prompt(dn["global_prompt"])) for dn in downs]
        self.train_prompt_block(copies, datas, round_, cids, purpose="finetune", epochs=self.epochs())
        with torch.no_grad():
            texts = self.encoder.encode_block(torch.stack([c.ctx for c in copies]))
        return [self.score(d, lambda x, t=t: (self.logit_scale * x @ t.t(), None)) for d, t in zip(datas, texts)]


class PromptFLFT(PromptFL):
    """PromptFL whose clients fine-tune the global prompt locally before evaluation (PromptFL+FT)."""
    Client = Client

