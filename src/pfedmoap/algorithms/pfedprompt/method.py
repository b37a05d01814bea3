"""pFedPrompt (Guo et al., WWW 2023, "pFedPrompt: Learning Personalized Prompt for Vision-Language
Models in Federated Learning"). No code of the authors is public; this is the closest well-defined
reading of the paper's description (docs/differences.md lists what is missing):

* consensus in the linguistic space: one text prompt, trained by every participant on its images
  and FedAvg'd as in PromptFL; it is the only thing that travels;
* personalization in the visual space: each client attends from a test image's feature to a
  non-parametric memory of its own training images (keys: their frozen, L2-normalised features;
  values: their one-hot labels), attention weights exp(-beta (1 - cos)); the attended labels are
  the personalized visual logits, added with weight alpha to the global prompt's CLIP logits:

      logits(x) = logit_scale x T_g^T + alpha exp(-beta (1 - x K^T)) onehot(Y).

The memory is the client's own data, read when it is evaluated: it never leaves the client, holds
no trained tensor, and the client state is the client's copy of the global prompt only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import EvalResult, Method
from ..coop.method import PromptFLClient, PromptFLServer, prompt_exchange


def memory_logits(x: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, n_classes: int, beta: float) -> torch.Tensor:
    """(B, C): exp(-beta (1 - x K^T)) onehot(Y); labels outside the C classes (another class set)
    add nothing."""
    known = labels < n_classes
    values = F.one_hot(labels[known], n_classes).to(x.dtype)
    return torch.exp(-beta * (1 - x @ keys[known].t())) @ values


class Client(PromptFLClient):
    """PromptFL's training and upload of the global prompt; evaluation adds the personalized visual
    attention over the client's memory."""

    def evaluate(self, state, data, round_, cid, down):
        if self._global_text is None or self._global_text[0] != round_:     # once per rank and round
            with torch.no_grad():
                self._global_text = (round_, self.encoder(self.prompt(down["global_prompt"])))
        text, o = self._global_text[1], self.options
        keys, labels = data.train_x, self._memory_labels(data.train_y)

        def logits(x):
            out = self.logit_scale * x @ text.t()
            if o.alpha > 0 and len(labels):
                out = out + o.alpha * memory_logits(x, keys, labels, text.shape[0], o.beta)
            return out, None
        return self.score(data, logits)

    def _memory_labels(self, train_y: torch.Tensor) -> torch.Tensor:
        """The memory's labels as indices of the evaluated class names (`self.encoder`; another
        class set under base2novel's Novel or cross_dataset): a class of the training names that
        is not among them gets index C, which adds nothing (memory_logits)."""
        names = list(self.encoder.classnames)
        trained = list(self.train_encoder.classnames)
        if trained == names:
            return train_y
        where = {n: i for i, n in enumerate(names)}
        lookup = torch.tensor([where.get(n, len(names)) for n in trained], dtype=torch.long, device=train_y.device)
        return lookup[train_y]

    def evaluate_global(self, state, data, round_, cid, down) -> EvalResult:
        """The global prompt alone (as PromptFL's evaluation)."""
        return PromptFLClient.evaluate(self, state, data, round_, cid, down)


class PFedPrompt(Method):
    """A global text prompt plus a personalized visual attention over each client's own image
    features (pFedPrompt, Guo et al. 2023)."""
    Server, Client = PromptFLServer, Client

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True, cfg=self.cfg)
