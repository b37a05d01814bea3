"""A method with two trained tensors and its own options section, defined in this file only (issue 20):
a global prompt, FedAvg'd as in PromptFL, plus a per-client low-rank correction U V added to it
(in the spirit of FedPGP's global + low-rank personal prompt). Both train with the shared routine
(algorithms/training.py), each with its own recipe; only the global part travels. It runs through
the real round loop in one process and under mpiexec -n 3 with identical results, and registering
it changes no other method's run hash."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfedmoap import algorithms, config, rng, store
from pfedmoap.algorithms import Manifest
from pfedmoap.algorithms.base import ClientPart, Method, PromptState
from pfedmoap.algorithms.coop.method import PromptFLServer, prompt_exchange
from pfedmoap.algorithms.training import Group, Recipe
from pfedmoap.comm import LocalComm
from pfedmoap.config import run_hash
from pfedmoap.errors import PFedMoAPError
from pfedmoap.federation import Federation

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
NAME, SECTION = "toy-lowrank", "toy_lowrank"


# ---------------------------------------------------------------------------- the method

@dataclass
class LowRankOptions:
    rank: int = 2                 # r: the correction is U (n_ctx, r) @ V (r, W)
    lr: float = 0.05              # the correction's learning rate (constant); the prompt's is [train]'s

    def validate(self):
        if not 1 <= self.rank <= 64:
            raise PFedMoAPError(f"{SECTION}.rank = {self.rank}: expected 1 to 64")
        if not self.lr > 0:
            raise PFedMoAPError(f"{SECTION}.lr = {self.lr}: expected > 0")


@dataclass
class LowRankState(PromptState):
    u: torch.Tensor = None        # (n_ctx, r), never leaves the client
    v: torch.Tensor = None        # (r, W)


class LowRankClient(ClientPart):
    def init_state(self, cid):
        ctx = super().init_state(cid).ctx
        r = self.options.rank
        gen = rng.torch_generator(self.cfg.seed, "toy-lowrank-init", 0, cid)
        return LowRankState(ctx=ctx, u=0.01 * torch.randn(ctx.shape[0], r, generator=gen),
                            v=torch.zeros(r, ctx.shape[1]))

    def state_tensors(self, state):
        return [state.ctx, state.u, state.v]

    def fit(self, state, data, round_, cid, down):
        if "global_prompt" in down:
            state.ctx = self.prompt(down["global_prompt"])
        ctx, u, v = (t.clone().requires_grad_(True) for t in (state.ctx, state.u, state.v))
        correction = Recipe.from_train(self.cfg.train, lr=self.options.lr, schedule="constant")
        self.local_train([Group([ctx], self.recipe()), Group([u, v], correction)],
                         lambda x, y: F.cross_entropy(self.logit_scale * x @ self.encoder(ctx + u @ v).t(), y),
                         data, round_, cid)
        state.ctx, state.u, state.v = ctx.detach(), u.detach(), v.detach()
        return {"prompt": self.upload_prompt(state.ctx, round_, cid), "n_samples": [len(data.train_y)]}

    def evaluate(self, state, data, round_, cid, down):
        state.ctx = self.prompt(down["global_prompt"])       # the new global prompt, its own correction
        with torch.no_grad():
            text = self.encoder(state.ctx + state.u @ state.v)
        return self.score(data, lambda x: (self.logit_scale * x @ text.t(), None))


class LowRank(Method):
    """Global prompt (FedAvg) + a personal low-rank correction U V that never travels."""
    Server, Client = PromptFLServer, LowRankClient

    def arrays(self):
        return prompt_exchange(self.setup.prompt_size, evaluate_global=True)


algorithms.register(Manifest(NAME, LowRank, section=SECTION, options=LowRankOptions,
                             summary="global prompt + a personal low-rank correction (a test's method)"))


# ---------------------------------------------------------------------------- runs

ROUNDS, N, N_CTX, W, RANK = 3, 6, 4, 64, 3           # tiny-clip's text width is 64
P = N_CTX * W
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", f"data.n_clients={N}",
        "data.n_train=300", "data.n_test=120", "data.min_size=5", "data.cache_dir=", f"rounds={ROUNDS}",
        "train.local_epochs=2", "train.warmup_epochs=0", "train.lr=0.01", "train.batch_size=8",
        "train.frac=0.5", "run.threads=1", f"prompt.n_ctx={N_CTX}", f"algorithm={NAME}",
        f"{SECTION}.rank={RANK}"]


class Trace:
    """A run in this process with every fit and the server's received uploads recorded."""

    def __init__(self, run_dir: Path):
        self.cfg = config.load(None, SETS)
        fed = self.fed = Federation(self.cfg, LocalComm())
        client, server = fed.client, fed.server
        self.fits, self.received = [], []

        def fit(state, data, r, c, down, _f=client.fit):
            before = [t.clone() for t in client.state_tensors(state)]
            up = _f(state, data, r, c, down)
            self.fits.append(dict(r=r, c=c, before=before, after=[t.clone() for t in client.state_tensors(state)],
                                  up={k: np.array(v) for k, v in up.items()}))
            return up

        def aggregate_fit(r, participants, uploads, _f=server.aggregate_fit):
            self.received.append(dict(r=r, participants=np.array(participants),
                                      uploads={k: np.array(v) for k, v in uploads.items()}))
            return _f(r, participants, uploads)

        client.fit, server.aggregate_fit = fit, aggregate_fit
        fed.run(run_dir)
        self.rounds = store.read_results(run_dir)["rounds"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return Trace(tmp_path_factory.mktemp("lowrank") / "run")


def test_both_tensors_train_with_their_own_options(traced):
    assert isinstance(traced.cfg.options, LowRankOptions) and traced.cfg.options.rank == RANK
    for e in traced.fits:
        (ctx0, u0, v0), (ctx1, u1, v1) = e["before"], e["after"]
        assert u1.shape == (N_CTX, RANK) and v1.shape == (RANK, W)
        assert not torch.equal(ctx0, ctx1) and not torch.equal(u0, u1) and not torch.equal(v0, v1)


def test_only_the_global_part_travels(traced):
    assert len(traced.received) == ROUNDS
    for got in traced.received:
        fits = {e["c"]: e for e in traced.fits if e["r"] == got["r"]}
        assert sorted(fits) == got["participants"].tolist()
        assert set(got["uploads"]) == {"prompt", "n_samples"}
        for row, c in zip(got["uploads"]["prompt"], got["participants"]):
            ctx, u, v = fits[c]["after"]
            np.testing.assert_array_equal(row, ctx.reshape(-1).numpy())            # the global part
            assert not np.array_equal(row, (ctx + u @ v).reshape(-1).numpy())     # not the personal prompt
    rounds = traced.rounds
    part = rounds["participated"]
    np.testing.assert_array_equal(rounds["bytes_up"], np.where(part, 4 * (P + 1), 0))
    fit_down = np.where(part, 4 * P, 0)
    fit_down[0] = 0                                         # nothing aggregated before round 1
    np.testing.assert_array_equal(rounds["bytes_down"], fit_down + 4 * P)   # + the global prompt to evaluate


def _cli(out: Path, ranks: int):
    script = out.parent / f"{out.name}.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "import test_two_tensor_method  # registers the method and its section\n"
                      "from pfedmoap import cli\n"
                      "sys.exit(cli.main(sys.argv[1:]))\n")
    args = [sys.executable, str(script), "run", "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return store.read_results(out)["rounds"], store.read_checkpoint(out)[1]


@pytest.mark.slow
def test_identical_at_one_and_three_ranks(tmp_path, traced):
    if not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec beside the venv's python")
    one, three = _cli(tmp_path / "r1", 0), _cli(tmp_path / "r3", 3)
    for k in ("accuracy", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(one[0][k], three[0][k], err_msg=k)
        np.testing.assert_array_equal(one[0][k], traced.rounds[k], err_msg=k)     # the CLI = the loop in process
    state = one[1]["clients/state"]
    assert state.shape == (N, P + N_CTX * RANK + RANK * W)          # prompt, U, V: all kept, all checkpointed
    for k in one[1]:
        np.testing.assert_array_equal(one[1][k], three[1][k], err_msg=k)


def _hashes_without_the_toy() -> dict[str, str]:
    code = ("import json, sys\n"
            "from pfedmoap import algorithms, config\n"
            "from pfedmoap.config import run_hash\n"
            "print(json.dumps({m: run_hash(config.load(None, [f'algorithm={m}'])) for m in algorithms.names()}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_registering_it_changes_no_other_methods_run_hash():
    without = _hashes_without_the_toy()                # a fresh process that never imported this file
    assert NAME not in without and len(without) >= 9
    here = {m: run_hash(config.load(None, [f"algorithm={m}"])) for m in without}
    assert here == without
    assert SECTION not in config.load(None, ["algorithm=promptfl"]).to_toml()     # only the run's own options
