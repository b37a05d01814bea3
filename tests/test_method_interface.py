"""The method interface (issue 12): a method defined in this file only — registered from outside the
package — runs through the real round loop, in one process and under mpiexec -n 3, with the same
results; its declared arrays travel and are counted, and the loop itself names no method."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfedmoap import algorithms
from pfedmoap.algorithms import Manifest
from pfedmoap.algorithms.base import Arrays, ClientPart, Log, Method, ServerPart
from pfedmoap.exchange import Array, PerClient

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
SRC = Path(__file__).resolve().parent.parent / "src" / "pfedmoap"


# ---------------------------------------------------------------------------- the toy method

class NearestServer(ServerPart):
    """Keeps every client's last upload; sends each participant the mean of the two stored prompts
    nearest to its own (by L2; its own excluded; fewer if fewer exist)."""

    def __init__(self, method):
        super().__init__(method)
        P = method.setup.prompt_size
        self.store = np.zeros((self.n_clients, P), np.float32)
        self.have = np.zeros(self.n_clients, bool)
        self.sent = np.full((self.n_clients, 2), -1, np.int32)

    def configure_fit(self, round_, participants):
        rows, counts = [], np.zeros(self.n_clients, np.int64)
        self.sent[:] = -1
        for c in participants:
            cand = np.flatnonzero(self.have & (np.arange(self.n_clients) != c))
            if not len(cand):
                continue
            d = ((self.store[cand] - self.store[c]) ** 2).sum(1)
            near = cand[np.lexsort((cand, d))[:2]]
            self.sent[c, :len(near)] = near
            rows.append(self.store[near].mean(0))
            counts[c] = 1
        P = self.store.shape[1]
        return {"nearest_mean": PerClient(np.array(rows, np.float32).reshape(-1, P), counts)}

    def aggregate_fit(self, round_, participants, uploads):
        self.store[participants] = uploads["prompt"]
        self.have[participants] = True

    def logs(self):
        return {"nearest": self.sent.copy()}

    def state_dict(self):
        return {"store": self.store, "have": self.have}

    def load_state_dict(self, state):
        self.store[...], self.have[...] = state["store"], state["have"]


class NearestClient(ClientPart):
    def fit(self, state, data, round_, cid, down):
        if "nearest_mean" in down:
            state.ctx = self.prompt(down["nearest_mean"][0])
        self.train_prompt(state, data, round_, cid)
        return {"prompt": state.ctx.reshape(-1).numpy()}

    def evaluate(self, state, data, round_, cid, down):
        res = super().evaluate(state, data, round_, cid, down)
        res.logs["ctx_norm"] = np.array([float(torch.linalg.norm(state.ctx))], np.float32)
        return res


class NearestMean(Method):
    Server, Client = NearestServer, NearestClient

    def arrays(self):
        P = self.setup.prompt_size
        return Arrays(fit_down=(Array("nearest_mean", P),), up=(Array("prompt", P),))

    def logs(self):
        return (Log("nearest", (2,), "int32", -1, "server", "the two clients averaged"),
                Log("ctx_norm", (1,), "float32", float("nan"), "client", "L2 norm of the prompt"))


algorithms.register(Manifest("toy-nearest-mean", NearestMean))


# ---------------------------------------------------------------------------- runs

SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=6",
        "data.n_train=300", "data.n_test=120", "data.min_size=5", "data.cache_dir=", "rounds=3",
        "train.local_epochs=1", "train.frac=0.5", "run.threads=1", "algorithm=toy-nearest-mean",
        "prompt.n_ctx=4"]


def _run(tmp: Path, ranks: int, name: str):
    script = tmp / "toy_run.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "import test_method_interface  # registers the toy method\n"
                      "from pfedmoap import cli\n"
                      "sys.exit(cli.main(sys.argv[1:]))\n")
    args = [sys.executable, str(script), "run", "--out", str(tmp / name)]
    for s in SETS:
        args += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    from pfedmoap import store
    return store.read_results(tmp / name)["rounds"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    return {r: _run(tmp, r, f"r{r}") for r in ((0, 3) if os.path.exists(MPIEXEC) else (0,))}


@pytest.mark.slow
def test_toy_method_downloads_are_the_nearest_means_and_counted(toy_runs):
    rounds = toy_runs[0]
    part, near = rounds["participated"], rounds["nearest"]
    P = 4 * 64                                                       # n_ctx x tiny-clip's text width
    assert near.shape == (3, 6, 2) and (near[0] == -1).all()        # nothing stored before round 1
    uploaded = np.zeros(6, bool)
    for r in range(3):
        for c in range(6):
            got = near[r, c][near[r, c] >= 0]
            if part[r, c]:
                assert c not in got and uploaded[got].all()
                assert len(got) == min(2, uploaded.sum() - uploaded[c])
            else:
                assert len(got) == 0
        down = np.where(part[r] & (near[r] >= 0).any(1), 4 * P, 0)   # one prompt row to whom it was sent
        np.testing.assert_array_equal(rounds["bytes_down"][r], down)
        np.testing.assert_array_equal(rounds["bytes_up"][r], np.where(part[r], 4 * P, 0))
        uploaded |= part[r]
    assert np.isfinite(rounds["ctx_norm"]).all() and rounds["ctx_norm"].shape == (3, 6, 1)


@pytest.mark.slow
def test_toy_method_identical_at_one_and_three_ranks(toy_runs):
    if 3 not in toy_runs:
        pytest.skip("no mpiexec beside the venv's python")
    for k in ("accuracy", "loss", "participated", "nearest", "ctx_norm", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(toy_runs[0][k], toy_runs[3][k], err_msg=k)


def test_round_loop_names_no_method():
    text = "\n".join((SRC / f).read_text() for f in ("federation.py", "exchange.py", "build.py"))
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for word in ("expert", "pool", "gating", "global_prompt", "global prompt", "pfedmoap.algorithms.",
                 "promptfl", "fedprox", "zeroshot", "router"):
        assert not re.search(word, code, re.I), word


def test_unknown_method_lists_the_registry():
    from pfedmoap.errors import PFedMoAPError
    with pytest.raises(PFedMoAPError, match="toy-nearest-mean"):
        algorithms.get("no-such-method")
