"""PromptFL+FedAMP: attentive message passing between the clients' prompts (FedAMP, Huang et al.,
AAAI 2021, "Personalized cross-silo federated learning on non-IID data", arXiv:2007.03797; the
"PromptFL+FedAMP" baseline of pFedMoAP's tables, Luo et al., ICLR 2025).

Server: keeps every client's last uploaded prompt w_j and sends each participant i its
personalised cloud prompt u_i = xi_ii w_i + sum_{j != i} xi_ij w_j (j over the stored prompts),
with the paper's heuristic attention for deep models (HeurFedAMP):

    xi_ij = (1 - xi_ii) * exp(sigma cos(w_i, w_j)) / sum_{h != i} exp(sigma cos(w_i, w_h)),

xi_ii = `fedamp.self_weight` a fixed self-attention value, sigma = `fedamp.sigma`.
Client: starts from u_i and trains with CoOp's loss plus the proximal term (lam/2) ||w - u_i||^2,
lam = `fedamp.lam` (the paper's lambda / alpha_k, with alpha_k fixed); uploads its prompt; is
evaluated with its own prompt (its personalised model; clients that did not train this round with
the one they last trained).

Decisions:
- start from u_i, not from the client's last prompt: the paper's client step is the proximal point
  argmin_w F_i(w) + lam/2 ||w - u_i||^2, which a few SGD epochs only approximate near where they
  start, and u_i (which holds xi_ii of the client's own prompt) is that step's anchor; as FLGo's
  FedAMP does. With DP on, w_i on the server is the noised upload, and so is its share in u_i.
- a participant whose prompt is not stored yet gets the plain mean of the stored prompts (no w_i to
  compare with); in round 1 nothing is stored, nothing is sent and it trains from the initial
  prompt without the proximal term, as PromptFL's first round does. A client whose prompt is the
  only one stored gets u_i = w_i.
- defaults: the paper leaves sigma and xi_ii as hyper-parameters (no single value for all data
  sets). Public re-implementations of HeurFedAMP use sigma = 0.1, xi_ii = 0.1, lambda = 1 with
  alpha_k = 0.002 (PFLlib's early run scripts) and sigma = 25, xi_ii = 1/N, lambda = 1 (FLGo).
  Here sigma = 25 (FLGo: cosines of prompts that start from one initialisation are all near 1, a
  small sigma would make the attention uniform), lam = 1 (both), and xi_ii = 0.5 (above both: the
  client restarts from u_i each round, so xi_ii is the share of its own prompt it keeps).
Bytes: one prompt row (4 P) down per participant (from round 2), one (4 P) up.
"""
from __future__ import annotations


import numpy as np

from ...exchange import Array, PerClient
from ..base import Arrays, ClientPart, Method, ServerPart


def attention(store: np.ndarray, have: np.ndarray, clients: np.ndarray, sigma: float,
              self_weight: float) -> np.ndarray:
    """(len(clients), N) float64 weights xi: row i mixes the stored prompts (columns with `have`)
    into client i's u_i; rows sum to 1 when anything is stored, and are zero otherwise."""
    N = len(have)
    xi = np.zeros((len(clients), N))
    stored = np.flatnonzero(have)
    if not len(stored):
        return xi
    w = store[stored].astype(np.float64)
    unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)
    pos = np.full(N, -1)
    pos[stored] = np.arange(len(stored))
    for row, i in enumerate(clients):
        if not have[i]:                        # nothing of its own to compare with: the plain mean
            xi[row, stored] = 1.0 / len(stored)
            continue
        others = stored != i
        if not others.any():                   # the only prompt stored is its own
            xi[row, i] = 1.0
            continue
        s = sigma * (unit[others] @ unit[pos[i]])
        e = np.exp(s - s.max())
        xi[row, stored[others]] = (1.0 - self_weight) * e / e.sum()
        xi[row, i] = self_weight
    return xi


class Server(ServerPart):
    """Every client's last upload; a personalised u_i per participant."""

    def __init__(self, method):
        super().__init__(method)
        self.store = np.zeros((self.n_clients, method.setup.prompt_size), np.float32)
        self.have = np.zeros(self.n_clients, bool)

    def configure_fit(self, round_, participants):
        if not self.have.any():
            return {}
        f = self.options
        xi = attention(self.store, self.have, participants, f.sigma, f.self_weight)
        counts = np.zeros(self.n_clients, np.int64)
        counts[participants] = 1
        u = (xi @ self.store.astype(np.float64)).astype(np.float32)
        return {"u": PerClient(u, counts)}

    def aggregate_fit(self, round_, participants, uploads):
        self.store[participants] = uploads["prompt"]
        self.have[participants] = True

    def state_dict(self):
        return {"store": self.store, "have": self.have}

    def load_state_dict(self, state):
        self.store[...] = state["store"]
        self.have[...] = state["have"]


class Client(ClientPart):
    """Starts from u_i, trains with the proximal term towards it, uploads; evaluated with its own prompt."""

    def fit(self, state, data, round_, cid, down):
        penalty = None
        got = down.get("u")
        if got is not None and len(got):
            u = self.prompt(got[0])
            state.ctx = u.clone()
            lam = self.options.lam
            if lam > 0:
                penalty = lambda ctx: 0.5 * lam * (ctx - u).pow(2).sum()  # noqa: E731
        self.train_prompt(state, data, round_, cid, penalty=penalty)
        return {"prompt": self.upload_prompt(state.ctx, round_, cid)}


class FedAMP(Method):
    """Personalised attention-weighted prompt per participant plus a proximal term (PromptFL+FedAMP)."""
    Server, Client = Server, Client

    def arrays(self) -> Arrays:
        P = self.setup.prompt_size
        return Arrays(fit_down=(Array("u", P),), up=(Array("prompt", P),))
