"""The PromptFL+X baselines of pFedMoAP's tables: promptfl_ft, fedper, fedamp.

Each method's defining property is checked on a run traced in this process (the real round loop,
the method's arrays recorded as they move); each runs through the CLI at 1 process and under
mpiexec -n 3 with identical results; fedamp stops on SIGUSR1 and resumes exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pfedmoap import config, store
from pfedmoap.algorithms.fedamp.method import attention
from pfedmoap.algorithms.base import PromptState, fedavg
from pfedmoap.comm import LocalComm
from pfedmoap.errors import PFedMoAPError
from pfedmoap.federation import Federation

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
METHODS = ("promptfl_ft", "fedper", "fedamp")
ROUNDS, N, N_CTX, WIDTH = 4, 6, 4, 64          # tiny-clip's text width is 64
P = N_CTX * WIDTH
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", f"data.n_clients={N}",
        "data.n_train=300", "data.n_test=120", "data.min_size=5", "data.cache_dir=", f"rounds={ROUNDS}",
        "train.local_epochs=1", "train.warmup_epochs=0", "train.lr=0.01", "train.batch_size=8",
        "train.frac=0.5", "run.threads=1", f"prompt.n_ctx={N_CTX}"]


def _sets(algorithm, *extra):
    return SETS + [f"algorithm={algorithm}", *extra]


# ---------------------------------------------------------------------------- runs

def _cli(out: Path, ranks: int, algorithm: str):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in _sets(algorithm):
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return store.read_results(out)["rounds"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    ranks = (0, 3) if os.path.exists(MPIEXEC) else (0,)
    runs = {(m, r): _cli(tmp / f"{m}-r{r}", r, m) for m in METHODS for r in ranks}
    runs["dirs"] = {m: tmp / f"{m}-r0" for m in METHODS}
    return runs


class Trace:
    """A run in this process with the client part's and server part's calls recorded."""

    def __init__(self, algorithm: str, run_dir: Path, *extra):
        self.cfg = config.load(None, _sets(algorithm, *extra))
        fed = self.fed = Federation(self.cfg, LocalComm())
        self.fit, self.evaluate, self.train, self.finetune = [], [], [], []
        self.configure_fit, self.configure_evaluate = [], []
        client, server = fed.client, fed.server

        def rec_fit(state, data, r, c, down, _f=client.fit):
            before = state.ctx.clone()
            up = _f(state, data, r, c, down)
            self.fit.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()}, before=before,
                                 after=state.ctx.clone(), up={k: np.array(v) for k, v in up.items()}))
            return up

        def rec_eval(state, data, r, c, down, _f=client.evaluate):
            before = state.ctx.clone()
            res = _f(state, data, r, c, down)
            self.evaluate.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()}, before=before,
                                      after=state.ctx.clone(), res=res))
            return res

        def rec_train(state, data, r, c, _f=client.train_prompt, **kw):
            self.train.append(dict(r=r, c=c, start=state.ctx.clone(), penalty=kw.get("penalty")))
            return _f(state, data, r, c, **kw)

        def rec_configure_fit(r, participants, _f=server.configure_fit):
            snap = {k: np.array(v) for k, v in server.state_dict().items()}
            out = _f(r, participants)
            self.configure_fit.append(dict(r=r, participants=np.array(participants), state=snap, out=out))
            return out

        def rec_configure_evaluate(r, evaluated, _f=server.configure_evaluate):
            out = _f(r, evaluated)
            self.configure_evaluate.append(dict(r=r, out=out))
            return out

        client.fit, client.evaluate, client.train_prompt = rec_fit, rec_eval, rec_train
        server.configure_fit, server.configure_evaluate = rec_configure_fit, rec_configure_evaluate
        if hasattr(client, "finetune"):
            def rec_ft(ctx, data, r, c, _f=client.finetune):
                out = _f(ctx, data, r, c)
                self.finetune.append(dict(r=r, c=c, start=ctx.clone(), out=out.clone()))
                return out
            client.finetune = rec_ft
        fed.run(run_dir)
        self.rounds = store.read_results(run_dir)["rounds"]
        self.n_train = fed.build.n_train
        self.init = client.init_state(0).ctx.clone()

    def fits(self, r):
        return {e["c"]: e for e in self.fit if e["r"] == r}

    def evals(self, r):
        return {e["c"]: e for e in self.evaluate if e["r"] == r}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traced")
    return {m: Trace(m, tmp / m) for m in (*METHODS, "promptfl")}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().reshape(-1)


# ---------------------------------------------------------------------------- promptfl_ft

@pytest.mark.slow
def test_promptfl_ft_evaluates_a_fine_tuned_copy_and_uploads_the_trained_prompt(traced):
    t, fl = traced["promptfl_ft"], traced["promptfl"]
    client = t.fed.client
    assert len(t.finetune) == ROUNDS * N                    # every evaluated client, every round
    for r in range(ROUNDS):
        g = t.configure_evaluate[r]["out"]["global_prompt"].row
        # the federation is PromptFL's: the same global prompt every round, bit for bit
        np.testing.assert_array_equal(g, fl.configure_evaluate[r]["out"]["global_prompt"].row)
        for c, e in t.fits(r).items():                   # the upload is the trained prompt, not a fine-tuned one
            np.testing.assert_array_equal(e["up"]["prompt"], _np(e["after"]))
            np.testing.assert_array_equal(e["up"]["prompt"], fl.fits(r)[c]["up"]["prompt"])
        ft = {e["c"]: e for e in t.finetune if e["r"] == r}
        for c, e in t.evals(r).items():
            np.testing.assert_array_equal(_np(ft[c]["start"]), g)          # fine-tunes the new global prompt
            assert not np.array_equal(_np(ft[c]["out"]), g)                   # ... into another prompt
            assert torch.equal(e["before"], e["after"])                       # which the client does not keep
    # the evaluated prompt is the fine-tuned one: its loss is the logged loss, the global prompt's is not
    r = ROUNDS - 1
    g = client.prompt(t.configure_evaluate[r]["out"]["global_prompt"].row)
    for e in (e for e in t.finetune if e["r"] == r):
        c, data = e["c"], t.fed.build.data[e["c"]]
        with torch.no_grad():
            mine, glob = client.encoder(e["out"]), client.encoder(g)
        own = client.score(data, lambda x: (client.logit_scale * x @ mine.t(), None))
        other = client.score(data, lambda x: (client.logit_scale * x @ glob.t(), None))
        assert t.rounds["loss"][r, c] == pytest.approx(own.loss, rel=1e-5)
        assert own.loss != other.loss
    assert not np.array_equal(t.rounds["loss"], fl.rounds["loss"])


@pytest.mark.slow
def test_promptfl_ft_fine_tuning_draws_its_own_batches(traced):
    """Distinct purpose: a participant's fine-tuning from the same start is not its training."""
    t = traced["promptfl_ft"]
    client, r = t.fed.client, 1
    c = next(iter(t.fits(r)))
    data = t.fed.build.data[c]
    start = client.prompt(t.fits(r)[c]["down"]["global_prompt"])
    trained = PromptState(ctx=start.clone())
    type(client).train_prompt(client, trained, data, r, c)
    again = client.finetune(start, data, r, c)
    assert torch.equal(again, client.finetune(start, data, r, c))         # a pure function of its keys
    assert not torch.equal(again, trained.ctx)


# ---------------------------------------------------------------------------- fedper

@pytest.mark.slow
def test_fedper_shares_the_first_rows_and_keeps_the_last_personal(traced):
    t = traced["fedper"]
    k = N_CTX - N_CTX // 2                                 # default n_personal = n_ctx // 2
    assert t.fed.method.n_shared == k
    personal = {c: t.init[k:] for c in range(N)}          # what each client's personal rows must be
    shared = t.init[:k]
    for r in range(ROUNDS):
        fits = t.fits(r)
        starts = {e["c"]: e["start"] for e in t.train if e["r"] == r}
        for c, e in fits.items():
            # the newest shared part arrives before training (from round 2 on)
            assert ("global_shared" in e["down"]) == (r > 0)
            if r:
                np.testing.assert_array_equal(e["down"]["global_shared"], _np(shared).reshape(-1))
            # training starts from the newest shared part + the client's own personal rows
            np.testing.assert_array_equal(_np(starts[c][:k]), _np(shared))
            np.testing.assert_array_equal(_np(starts[c][k:]), _np(personal[c]))
            assert e["up"]["shared"].shape == (k * WIDTH,)                      # only the shared rows leave
            np.testing.assert_array_equal(e["up"]["shared"], _np(e["after"][:k]))
            assert not torch.equal(e["after"][k:], personal[c])                # it trained its personal rows
            personal[c] = e["after"][k:].clone()
        ids = sorted(fits)
        expect = fedavg(np.stack([fits[c]["up"]["shared"] for c in ids]), t.n_train[ids])
        np.testing.assert_array_equal(t.configure_evaluate[r]["out"]["global_shared"].row, expect)
        for c, e in t.evals(r).items():
            np.testing.assert_array_equal(e["down"]["global_shared"], expect)
            assert torch.equal(e["after"], e["before"])                       # evaluation keeps the state
            assert torch.equal(e["after"][k:], personal[c])                   # personal rows: never aggregated
        shared = torch.from_numpy(expect).reshape(k, WIDTH)
    trained = [c for c in range(N) if not torch.equal(personal[c], t.init[k:])]
    assert len(trained) >= 3
    for i in trained:                                     # and they differ across clients
        for j in trained:
            assert i == j or not torch.equal(personal[i], personal[j])


@pytest.mark.slow
def test_fedper_bytes_are_the_shared_part(cli_runs):
    rounds = cli_runs[("fedper", 0)]
    S = (N_CTX - N_CTX // 2) * WIDTH
    part = rounds["participated"].astype(bool)
    part[0] = False                                       # round 1: nothing to download before training
    np.testing.assert_array_equal(rounds["bytes_down"], np.where(part, 8 * S, 4 * S))
    np.testing.assert_array_equal(rounds["bytes_up"], np.where(rounds["participated"], 4 * S + 4, 0))


def test_fedper_n_personal_must_leave_a_shared_row(tmp_path):
    with pytest.raises(PFedMoAPError, match=r"fedper.n_personal = 4: expected 0 to 3"):
        Federation(config.load(None, _sets("fedper", "fedper.n_personal=4")), LocalComm())
    with pytest.raises(PFedMoAPError, match=r"fedper.n_personal = -2"):
        config.load(None, _sets("fedper", "fedper.n_personal=-2"))


# ---------------------------------------------------------------------------- fedamp

def _u_by_formula(store_, have, i, sigma, self_weight):
    """u_i recomputed from the stored prompts, term by term."""
    stored = [j for j in range(len(have)) if have[j]]
    w = store_.astype(np.float64)
    if not have[i]:
        return np.mean([w[j] for j in stored], axis=0)
    others = [j for j in stored if j != i]
    if not others:
        return w[i]
    cos = {j: w[i] @ w[j] / (np.linalg.norm(w[i]) * np.linalg.norm(w[j])) for j in others}
    z = sum(np.exp(sigma * cos[h]) for h in others)
    return self_weight * w[i] + sum((1 - self_weight) * np.exp(sigma * cos[j]) / z * w[j] for j in others)


@pytest.mark.slow
def test_fedamp_downloads_are_the_attention_weighted_prompts(traced):
    t = traced["fedamp"]
    f = t.cfg.options
    assert (f.sigma, f.self_weight, f.lam) == (25.0, 0.5, 1.0)
    uploaded = np.zeros(N, bool)
    for r in range(ROUNDS):
        cf = t.configure_fit[r]
        part = cf["participants"]
        if r == 0:
            assert cf["out"] == {} and not cf["state"]["have"].any()       # nothing stored, nothing sent
            assert all("u" not in e["down"] for e in t.fits(0).values())
        else:
            np.testing.assert_array_equal(cf["state"]["have"], uploaded)
            payload = cf["out"]["u"]
            np.testing.assert_array_equal(payload.counts, np.isin(np.arange(N), part).astype(int))
            for row, i in zip(payload.rows, part):
                expect = _u_by_formula(cf["state"]["store"], cf["state"]["have"], i, f.sigma, f.self_weight)
                np.testing.assert_allclose(row, expect, rtol=1e-5, atol=1e-7)
                np.testing.assert_array_equal(t.fits(r)[i]["down"]["u"][0], row)
            for a in range(len(part)):                                        # personalised: all distinct
                for b in range(a):
                    assert not np.array_equal(payload.rows[a], payload.rows[b])
        for c, e in t.fits(r).items():
            np.testing.assert_array_equal(e["up"]["prompt"], _np(e["after"]))
        uploaded[part] = True
    # the client starts from u_i and is pulled towards it by lam/2 ||w - u_i||^2
    for e in (e for e in t.train if e["r"] > 0):
        u = t.fits(e["r"])[e["c"]]["down"]["u"][0]
        np.testing.assert_array_equal(_np(e["start"]), u)
        d = torch.full_like(e["start"], 0.1)
        assert e["penalty"](e["start"]).item() == 0
        assert e["penalty"](e["start"] + d).item() == pytest.approx(0.5 * f.lam * float(d.pow(2).sum()), rel=1e-5)
    # evaluated with its own prompt: what it last trained
    last = {}
    for r in range(ROUNDS):
        last.update({c: e["after"] for c, e in t.fits(r).items()})
        for c, e in t.evals(r).items():
            assert torch.equal(e["before"], last.get(c, t.init))


@pytest.mark.slow
def test_fedamp_bytes_are_one_prompt_each_way(cli_runs):
    rounds = cli_runs[("fedamp", 0)]
    sent = np.zeros((ROUNDS, N), bool)
    sent[1:] = rounds["participated"][1:]
    np.testing.assert_array_equal(rounds["bytes_down"], np.where(sent, 4 * P, 0))
    np.testing.assert_array_equal(rounds["bytes_up"], np.where(rounds["participated"], 4 * P, 0))


def test_fedamp_attention_weights():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    w[1] = w[0] + 0.05 * w[3]                              # client 1 is close to client 0
    have = np.array([True, True, True, False])
    xi = attention(w, have, np.array([0, 2, 3]), sigma=5.0, self_weight=0.3)
    assert np.allclose(xi.sum(1), 1) and (xi[:, 3] == 0).all()
    assert xi[0, 0] == 0.3 and xi[1, 2] == 0.3
    assert xi[0, 1] > xi[0, 2]                             # more attention to the similar prompt
    np.testing.assert_allclose(xi[2], [1 / 3, 1 / 3, 1 / 3, 0])     # not stored yet: the plain mean
    alone = attention(w, np.array([False, False, True, False]), np.array([2, 0]), 5.0, 0.3)
    np.testing.assert_array_equal(alone, [[0, 0, 1, 0], [0, 0, 1, 0]])
    assert not attention(w, np.zeros(4, bool), np.array([1]), 5.0, 0.3).any()
    for bad, msg in (("fedamp.sigma=-1", "fedamp.sigma = -1.0: expected > 0"),
                     ("fedamp.self_weight=2", "fedamp.self_weight = 2.0"), ("fedamp.lam=-1", "fedamp.lam = -1.0")):
        with pytest.raises(PFedMoAPError, match=msg):
            config.load(None, _sets("fedamp", bad))


# ---------------------------------------------------------------------------- every method, every rank count

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_identical_at_one_and_three_ranks(cli_runs, method):
    if (method, 3) not in cli_runs:
        pytest.skip("no mpiexec beside the venv's python")
    a, b = cli_runs[(method, 0)], cli_runs[(method, 3)]
    assert a["accuracy"].shape == (ROUNDS, N) and np.isfinite(a["accuracy"]).all()
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_cli_run_matches_the_traced_run(cli_runs, traced, method):
    np.testing.assert_array_equal(cli_runs[(method, 0)]["accuracy"], traced[method].rounds["accuracy"])


# ---------------------------------------------------------------------------- checkpoint and resume

@pytest.mark.slow
def test_fedamp_stops_on_a_signal_and_resumes_exactly(cli_runs, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in _sets("fedamp", "run.checkpoint_every=0"):
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "results.h5").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    with h5py.File(out / "checkpoint.h5") as f:
        assert 1 <= f.attrs["round"] < ROUNDS
    resume = [sys.executable, "-m", "pfedmoap.cli", "resume", str(out)]
    if os.path.exists(MPIEXEC):
        resume = [MPIEXEC, "-n", "3", *resume]
    p = subprocess.run(resume, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got, ref = store.read_results(out)["rounds"], cli_runs[("fedamp", 0)]
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    with h5py.File(out / "checkpoint.h5") as a, h5py.File(cli_runs["dirs"]["fedamp"] / "checkpoint.h5") as b:
        for k in ("clients/state", "server/store", "server/have"):
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)
