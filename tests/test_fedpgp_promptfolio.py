"""FedPGP and PromptFolio (issue 23): what each sends and keeps, how its personal model is formed,
asserted from the arrays and bytes of runs traced in this process; identical at 1 and 3 ranks
(mpiexec -n 3); a stopped and resumed run equals an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfedmoap import algorithms, config, store
from pfedmoap.algorithms.base import ClientData, PromptState, Setup, fedavg
from pfedmoap.algorithms.fedpgp.method import contrastive_loss
from pfedmoap.clip.prompt import PromptEncoder
from pfedmoap.comm import LocalComm
from pfedmoap.errors import PFedMoAPError
from pfedmoap.federation import Federation

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ROUNDS, N, N_CTX, W, RANK = 3, 6, 4, 64, 3            # tiny-clip's text width is 64
P = N_CTX * W
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", f"data.n_clients={N}",
        "data.n_train=150", "data.n_test=60", "data.min_size=5", "data.cache_dir=", f"rounds={ROUNDS}",
        "train.local_epochs=1", "train.warmup_epochs=0", "train.lr=0.01", "train.batch_size=8",
        "train.frac=0.5", "run.threads=1", f"prompt.n_ctx={N_CTX}", "run.progress=false"]
OWN = {"fedpgp": [f"fedpgp.rank={RANK}"], "promptfolio": []}


def _sets(name, *extra):
    return SETS + [f"algorithm={name}", *OWN[name], *extra]


# ---------------------------------------------------------------------------- config

def test_defaults_are_the_authors_and_bad_values_are_refused():
    o = config.load(None, ["algorithm=fedpgp"]).options
    assert (o.rank, o.mu, o.temp, o.all_clients_first_round) == (8, 0.5, 0.5, True)
    assert config.load(None, ["algorithm=promptfolio"]).options.theta == 0.4
    m = {n: algorithms.manifest(n) for n in ("fedpgp", "promptfolio")}
    assert [m[n].label for n in m] == ["FedPGP", "PromptFolio"] and all(x.quickstart for x in m.values())
    order = [x.name for x in algorithms.manifests()]
    assert order.index("fedotp") < order.index("fedpgp") < order.index("promptfolio") < order.index("pfedmoap")
    for bad, msg in (("fedpgp.rank=0", "fedpgp.rank = 0: expected 1 to 4096"),
                     ("fedpgp.mu=-1", "fedpgp.mu = -1.0: expected >= 0"),
                     ("fedpgp.temp=0", "fedpgp.temp = 0.0: expected > 0"),
                     ("promptfolio.theta=1.5", "promptfolio.theta = 1.5: expected 0 <= theta <= 1")):
        name = bad.split(".")[0]
        with pytest.raises(PFedMoAPError, match=msg.replace(".", r"\.")):
            config.load(None, [f"algorithm={name}", bad])


# ---------------------------------------------------------------------------- client parts in one process

CLASSES = ["cat", "dog", "bird", "fish", "frog"]


def _client(name, tiny_backbone, *extra):
    cfg = config.load(None, _sets(name, *extra))
    encoder = PromptEncoder(tiny_backbone, CLASSES, N_CTX)
    return algorithms.get(name)(Setup(cfg, N, encoder, tiny_backbone, (N_CTX, W))).client()


def _data(seed, n=24, n_test=12, D=128):
    g = torch.Generator().manual_seed(seed)
    x = lambda k: F.normalize(torch.randn(k, D, generator=g), dim=-1)       # noqa: E731
    return ClientData(x(n), torch.randint(len(CLASSES), (n,), generator=g), x(n_test),
                      torch.randint(len(CLASSES), (n_test,), generator=g))


def _scored(client, data, text):
    return client.score(data, lambda x: (client.logit_scale * x @ text.t(), None))


def test_fedpgp_contrastive_loss_is_the_two_way_softmax_of_the_pairs():
    g = torch.Generator().manual_seed(0)
    t0, ts, tp = (F.normalize(torch.randn(5, 16, generator=g), dim=-1) for _ in range(3))
    pos, neg = F.cosine_similarity(t0, ts, dim=-1), F.cosine_similarity(ts, tp, dim=-1)
    want = -torch.log(torch.exp(pos / 0.5) / (torch.exp(pos / 0.5) + torch.exp(neg / 0.5))).mean()
    assert contrastive_loss(t0, ts, tp, 0.5).item() == pytest.approx(want.item(), rel=1e-5)
    # it falls as the global prompt's features move towards CLIP's and away from the personal ones
    assert contrastive_loss(t0, t0, -t0, 0.5) < contrastive_loss(t0, ts, tp, 0.5) < contrastive_loss(t0, -t0, -t0, 0.5)


def test_fedpgp_personal_prompt_is_global_plus_uv_and_only_the_global_leaves(tiny_backbone):
    client = _client("fedpgp", tiny_backbone)
    state, data = client.init_state(2), _data(1)
    assert state.u.shape == (N_CTX, RANK) and state.v.shape == (RANK, W)
    other = client.init_state(5)                          # every client starts from the same sigma, U, V
    assert all(torch.equal(a, b) for a, b in zip(client.state_tensors(state), client.state_tensors(other)))
    before = [t.clone() for t in client.state_tensors(state)]
    up = client.fit(state, data, 1, 2, {})
    assert set(up) == {"prompt", "n_samples"} and up["n_samples"] == [24]
    assert all(not torch.equal(a, b) for a, b in zip(before, client.state_tensors(state)))   # all three train
    np.testing.assert_array_equal(up["prompt"], state.ctx.reshape(-1).numpy())              # sigma leaves
    personal = state.ctx + state.u @ state.v
    assert not np.array_equal(up["prompt"], personal.reshape(-1).numpy())                   # sigma + U V does not
    # evaluation: a downloaded sigma plus the client's own U V; the global model: sigma alone
    sigma = torch.randn(N_CTX, W, generator=torch.Generator().manual_seed(9)) * 0.02
    down = {"global_prompt": sigma.reshape(-1).numpy()}
    kept = client.state_vector(state)
    res, glob = client.evaluate(state, data, 1, 2, down), client.evaluate_global(state, data, 1, 2, down)
    np.testing.assert_array_equal(client.state_vector(state), kept)                         # keeps the state
    with torch.no_grad():
        mine, alone = client.encoder(sigma + state.u @ state.v), client.encoder(sigma)
    assert res.loss == _scored(client, data, mine).loss and glob.loss == _scored(client, data, alone).loss
    assert res.loss != glob.loss
    assert client.evaluate_global(state, data, 1, 2, {}) is None
    # the checkpoint holds sigma, U and V and restores them
    fresh = client.init_state(2)
    client.load_state_vector(fresh, kept)
    assert kept.shape == (P + N_CTX * RANK + RANK * W,)
    assert all(torch.equal(a, b) for a, b in zip(client.state_tensors(fresh), client.state_tensors(state)))


def test_fedpgp_contrastive_term_pulls_sigma_towards_clip(tiny_backbone):
    """mu = 0 is cross-entropy alone; mu > 0 moves sigma's text features closer to the anchor's."""
    runs = {}
    for mu in (0.0, 5.0):
        client = _client("fedpgp", tiny_backbone, f"fedpgp.mu={mu}")
        state = client.init_state(0)
        client.fit(state, _data(3), 0, 0, {})
        with torch.no_grad():
            runs[mu] = float((client.anchor() * client.encoder(state.ctx)).sum(-1).mean())
    assert runs[5.0] > runs[0.0]


def test_fedpgp_anchor_is_clip_on_the_initial_prompt_text(tiny_backbone):
    client = _client("fedpgp", tiny_backbone)
    tower = tiny_backbone.model
    tokens = tiny_backbone.tokenizer(["X X X X"])[0][1:1 + N_CTX]
    with torch.no_grad():
        words = tower.token_embedding(tokens)
        assert torch.equal(client.anchor(), client.encoder(words))


def test_promptfolio_mixes_text_features_with_theta(tiny_backbone):
    client = _client("promptfolio", tiny_backbone, "promptfolio.theta=0.3")
    state, data = client.init_state(1), _data(4)
    assert not torch.equal(state.ctx, state.local)                  # two draws, the same for every client
    assert torch.equal(state.local, client.init_state(4).local)
    up = client.fit(state, data, 1, 1, {})
    np.testing.assert_array_equal(up["prompt"], state.ctx.reshape(-1).numpy())     # the global prompt leaves
    assert not np.allclose(up["prompt"], state.local.reshape(-1).numpy())          # the local one does not
    g = torch.randn(N_CTX, W, generator=torch.Generator().manual_seed(2)) * 0.02
    down = {"global_prompt": g.reshape(-1).numpy()}
    with torch.no_grad():
        tg, tl = client.encoder(g), client.encoder(state.local)
    res = client.evaluate(state, data, 1, 1, down)
    assert res.loss == pytest.approx(_scored(client, data, 0.7 * tg + 0.3 * tl).loss, rel=1e-6)
    # the mixture of features is the same mixture of the two prompts' logits
    x = data.test_x
    np.testing.assert_allclose((x @ (0.7 * tg + 0.3 * tl).t()).numpy(),
                               (0.7 * x @ tg.t() + 0.3 * x @ tl.t()).numpy(), rtol=1e-5, atol=1e-6)
    assert client.evaluate_global(state, data, 1, 1, down).loss == _scored(client, data, tg).loss


def test_promptfolio_theta_0_is_promptfl_and_theta_1_is_coop(tiny_backbone):
    data, g = _data(5), torch.randn(N_CTX, W, generator=torch.Generator().manual_seed(3)) * 0.02
    down = {"global_prompt": g.reshape(-1).numpy()}
    promptfl = algorithms.get("promptfl")(Setup(config.load(None, SETS + ["algorithm=promptfl"]), N,
                                                PromptEncoder(tiny_backbone, CLASSES, N_CTX), tiny_backbone,
                                                (N_CTX, W))).client()
    # theta = 0: the global prompt alone, trained and uploaded bit for bit as PromptFL's
    zero = _client("promptfolio", tiny_backbone, "promptfolio.theta=0")
    s0, sf = zero.init_state(3), promptfl.init_state(3)
    np.testing.assert_array_equal(zero.fit(s0, data, 2, 3, down)["prompt"], promptfl.fit(sf, data, 2, 3, down)["prompt"])
    assert zero.evaluate(s0, data, 2, 3, down).loss == promptfl.evaluate(sf, data, 2, 3, down).loss
    # theta = 1: the local prompt alone, trained as CoOp trains a prompt from the same start
    one = _client("promptfolio", tiny_backbone, "promptfolio.theta=1")
    s1 = one.init_state(3)
    coop = PromptState(ctx=s1.local.clone())
    one.fit(s1, data, 2, 3, down)
    promptfl.train_prompt(coop, data, 2, 3)
    assert torch.equal(s1.local, coop.ctx)
    with torch.no_grad():
        mine = one.encoder(s1.local)
    assert one.evaluate(s1, data, 2, 3, down).loss == _scored(one, data, mine).loss


# ---------------------------------------------------------------------------- runs

class Trace:
    """A run in this process with the client's fits and evaluations and the server's uploads recorded."""

    def __init__(self, name: str, run_dir: Path):
        self.cfg = config.load(None, _sets(name, "run.checkpoint_every=0"))
        fed = self.fed = Federation(self.cfg, LocalComm())
        client, server = fed.client, fed.server
        self.fits, self.evals, self.received, self.sent = [], [], [], []

        def fit(state, data, r, c, down, _f=client.fit):
            before = [t.clone() for t in client.state_tensors(state)]
            up = _f(state, data, r, c, down)
            self.fits.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()}, before=before,
                                  after=[t.clone() for t in client.state_tensors(state)],
                                  up={k: np.array(v) for k, v in up.items()}))
            return up

        def evaluate(state, data, r, c, down, _f=client.evaluate):
            before = client.state_vector(state)
            res = _f(state, data, r, c, down)
            self.evals.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()},
                                   state=[t.clone() for t in client.state_tensors(state)], res=res,
                                   kept=np.array_equal(before, client.state_vector(state))))
            return res

        def aggregate_fit(r, participants, uploads, _f=server.aggregate_fit):
            self.received.append(dict(r=r, participants=np.array(participants),
                                      uploads={k: np.array(v) for k, v in uploads.items()}))
            return _f(r, participants, uploads)

        client.fit, client.evaluate, server.aggregate_fit = fit, evaluate, aggregate_fit
        fed.run(run_dir)
        self.rounds = store.read_results(run_dir)["rounds"]
        self.ckpt = store.read_checkpoint(run_dir)[1]
        self.n_train = fed.build.n_train


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traced")
    return {m: Trace(m, tmp / m) for m in ("fedpgp", "promptfolio")}


def _bytes_as_promptfl(rounds, first_round_all: bool):
    part = rounds["participated"].astype(bool)
    assert part[0].all() == first_round_all
    np.testing.assert_array_equal(rounds["bytes_up"], np.where(part, 4 * (P + 1), 0))     # sigma + the count
    fit_down = np.where(part, 4 * P, 0)
    fit_down[0] = 0                                             # nothing aggregated before round 1
    np.testing.assert_array_equal(rounds["bytes_down"], fit_down + 4 * P)    # + the global one to evaluate


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedpgp", "promptfolio"])
def test_only_the_global_prompt_travels_and_is_fedavgd(traced, name):
    t = traced[name]
    _bytes_as_promptfl(t.rounds, first_round_all=name == "fedpgp")    # FedPGP: round 0 trains everyone
    for got in t.received:
        fits = {e["c"]: e for e in t.fits if e["r"] == got["r"]}
        assert sorted(fits) == got["participants"].tolist()
        assert set(got["uploads"]) == {"prompt", "n_samples"}
        for row, c in zip(got["uploads"]["prompt"], got["participants"]):
            np.testing.assert_array_equal(row, fits[c]["after"][0].reshape(-1).numpy())    # the global part
        ids = got["participants"]
        g = fedavg(got["uploads"]["prompt"], t.n_train[ids])
        for e in (e for e in t.evals if e["r"] == got["r"]):
            np.testing.assert_array_equal(e["down"]["global_prompt"], g)
            assert e["kept"]                                                  # evaluation keeps the state
        for e in (e for e in t.fits if e["r"] == got["r"] + 1):             # the next participants start from it
            np.testing.assert_array_equal(e["down"]["global_prompt"], g)
    np.testing.assert_array_equal(t.ckpt["server/global_prompt"], fedavg(t.received[-1]["uploads"]["prompt"],
                                                                         t.n_train[t.received[-1]["participants"]]))


@pytest.mark.slow
def test_fedpgp_personal_part_is_uv_kept_and_evaluated_on_the_new_global(traced):
    t = traced["fedpgp"]
    client = t.fed.client
    last = {}
    for r in range(ROUNDS):
        last.update({e["c"]: e["after"] for e in t.fits if e["r"] == r})
        for e in (e for e in t.evals if e["r"] == r):
            sigma, u, v = e["state"]
            assert torch.equal(u, last[e["c"]][1]) and torch.equal(v, last[e["c"]][2])   # U V: its own, as trained
            if e["c"] in (0, 3):       # the logged loss is the personal prompt's: new global + own U V
                g = client.prompt(e["down"]["global_prompt"])
                with torch.no_grad():
                    text = client.encoder(g + u @ v)
                assert t.rounds["loss"][r, e["c"]] == pytest.approx(
                    _scored(client, t.fed.build.data[e["c"]], text).loss, rel=1e-5)
    state = t.ckpt["clients/state"]
    assert state.shape == (N, P + N_CTX * RANK + RANK * W)
    uv = state[:, P:]
    assert len({row.tobytes() for row in uv}) == N                 # six personal terms, none uploaded
    for got in t.received:
        for row in got["uploads"]["prompt"]:
            assert row.shape == (P,)


@pytest.mark.slow
def test_promptfolio_local_prompt_is_kept_and_mixed(traced):
    t = traced["promptfolio"]
    client, theta = t.fed.client, t.cfg.options.theta
    state = t.ckpt["clients/state"]
    assert state.shape == (N, 2 * P)
    trained = t.rounds["participated"].any(0)
    assert len({state[c, P:].tobytes() for c in np.flatnonzero(trained)}) == trained.sum()   # personal local prompts
    e = next(e for e in t.evals if e["r"] == ROUNDS - 1)
    with torch.no_grad():
        tg, tl = client.encoder(client.prompt(e["down"]["global_prompt"])), client.encoder(e["state"][1])
    want = _scored(client, t.fed.build.data[e["c"]], (1 - theta) * tg + theta * tl)
    assert t.rounds["loss"][ROUNDS - 1, e["c"]] == pytest.approx(want.loss, rel=1e-5)


def _cli(out: Path, ranks: int, name: str):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in _sets(name, "run.checkpoint_every=0"):
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return store.read_results(out)["rounds"], store.read_checkpoint(out)[1]


KEYS = ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedpgp", "promptfolio"])
def test_identical_at_one_and_three_ranks(traced, tmp_path, name):
    if not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec beside the venv's python")
    rounds, ckpt = _cli(tmp_path / "r3", 3, name)
    for k in KEYS:
        np.testing.assert_array_equal(rounds[k], traced[name].rounds[k], err_msg=k)
    for k in traced[name].ckpt:
        np.testing.assert_array_equal(ckpt[k], traced[name].ckpt[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedpgp", "promptfolio"])
def test_stop_and_resume_is_exact(traced, tmp_path, name):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in _sets(name, "run.checkpoint_every=0"):
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (out / "results.h5").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert 1 <= store.read_checkpoint(out)[0]["round"] < ROUNDS
    resume = [sys.executable, "-m", "pfedmoap.cli", "resume", str(out)]
    p = subprocess.run(([MPIEXEC, "-n", "3"] if os.path.exists(MPIEXEC) else []) + resume,
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got, ckpt = store.read_results(out)["rounds"], store.read_checkpoint(out)[1]
    for k in KEYS:
        np.testing.assert_array_equal(got[k], traced[name].rounds[k], err_msg=k)
    for k in traced[name].ckpt:
        np.testing.assert_array_equal(ckpt[k], traced[name].ckpt[k], err_msg=k)


@pytest.mark.parametrize("name", ["fedpgp", "promptfolio"])
def test_dp_gradient_clipping_covers_the_global_prompt_only(tiny_backbone, name):
    """dp.mechanism "gradient": every step clips the gradient of the rows that are uploaded (the
    global prompt), not of the personal part (U V; the local prompt), which never leaves."""
    from pfedmoap.algorithms.training import Group, Recipe
    client = _client(name, tiny_backbone, "dp.clip=0.5", "dp.noise_multiplier=1")
    g = torch.Generator().manual_seed(0)
    if name == "fedpgp":
        params = [torch.zeros(N_CTX, W), torch.zeros(N_CTX, RANK), torch.zeros(RANK, W)]
    else:
        params = [torch.zeros(2, N_CTX, W)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 10
    personal = [p.grad.clone() for p in params[1:]] or [params[0].grad[1].clone()]
    client.after_backward([Group(params, Recipe.from_train(client.cfg.train))])
    glob = params[0].grad if name == "fedpgp" else params[0].grad[0]
    assert float(glob.norm()) == pytest.approx(0.5, rel=1e-5)                # clipped to dp.clip
    kept = [p.grad for p in params[1:]] or [params[0].grad[1]]
    assert all(torch.equal(a, b) for a, b in zip(kept, personal))          # the personal part is not
