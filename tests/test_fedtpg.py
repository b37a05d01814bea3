"""FedTPG: what travels is the prompt generator's parameters (one flat float32 row each way, nothing
class-specific), the server FedAvgs them, every client is evaluated with the global network, and
the generated context depends on the class names it is given (so a client part over other class
names evaluates them). The network equals the authors' modules (nn.MultiheadAttention + GEGLU
feed-forward); 1 and 3 ranks give identical results; a stopped run resumes exactly."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfedmoap import config, federation, rng, store
from pfedmoap.algorithms.base import fedavg
from pfedmoap.algorithms.fedtpg.method import PromptGenerator, cosine_lr
from pfedmoap.clip.prompt import PromptEncoder
from pfedmoap.comm import LocalComm
from pfedmoap.errors import PFedMoAPError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ROUNDS, N, N_CTX, WIDTH, EMBED = 3, 4, 4, 64, 128          # tiny-clip: text width 64, embed_dim 128
SETS = ["algorithm=fedtpg", "model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic",
        f"data.n_clients={N}", "data.n_train=160", "data.n_test=60", "data.min_size=5", "data.cache_dir=",
        f"rounds={ROUNDS}", "train.frac=0.5", "run.threads=1", f"prompt.n_ctx={N_CTX}", "run.progress=false",
        "fedtpg.batch_size=8", "fedtpg.lr=0.05", "run.checkpoint_every=1"]


# ---------------------------------------------------------------------------- the network

@pytest.mark.parametrize("width, text_dim, depth", [(64, 128, 0), (128, 128, 2)])
def test_generator_is_the_authors_network(width, text_dim, depth):
    """The flat-vector network computes what model/prompt_net.py's modules compute with the same
    weights: LayerNorms, nn.MultiheadAttention (packed or separate q/k/v), GEGLU feed-forward."""
    g = PromptGenerator(N_CTX, width, text_dim, heads=4, depth=depth)
    flat = g.init(torch.Generator().manual_seed(1))
    flat = flat + 0.01 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(2))
    p = g.unflatten(flat)
    emb = torch.randn(7, text_dim, generator=torch.Generator().manual_seed(3))

    def mha(prefix, kdim):
        m = nn.MultiheadAttention(width, 4, kdim=kdim, vdim=kdim, batch_first=True)
        with torch.no_grad():
            if kdim == width:
                m.in_proj_weight.copy_(torch.cat([p[f"{prefix}.{k}.w"] for k in "qkv"]))
            else:
                m.q_proj_weight.copy_(p[f"{prefix}.q.w"])
                m.k_proj_weight.copy_(p[f"{prefix}.k.w"])
                m.v_proj_weight.copy_(p[f"{prefix}.v.w"])
            m.in_proj_bias.copy_(p[f"{prefix}.qkv.b"])
            m.out_proj.weight.copy_(p[f"{prefix}.out.w"])
            m.out_proj.bias.copy_(p[f"{prefix}.out.b"])
        return m

    def ff(prefix):
        m = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 8 * width), nn.Identity(), nn.Linear(4 * width, width))
        with torch.no_grad():
            for i, k in ((0, "ln"), (1, "in"), (3, "out")):
                m[i].weight.copy_(p[f"{prefix}.ff.{k}.w"])
                m[i].bias.copy_(p[f"{prefix}.ff.{k}.b"])
        return lambda x: m[3](_geglu(m[1](m[0](x))))

    def ln(prefix, dim):
        m = nn.LayerNorm(dim)
        with torch.no_grad():
            m.weight.copy_(p[prefix + ".w"])
            m.bias.copy_(p[prefix + ".b"])
        return m

    with torch.no_grad():
        q, kv = ln("cross.ln_q", width)(p["queries"])[None], ln("cross.ln_kv", text_dim)(emb)[None]
        x = mha("cross", text_dim)(q, kv, kv)[0]
        x = ff("cross")(x) + x
        for i in range(depth):
            h = ln(f"self{i}.ln", width)(x)
            x = mha(f"self{i}", width)(h, h, h)[0] + x
            x = ff(f"self{i}")(x) + x
        got = g(flat, emb)
    assert got.shape == (N_CTX, width)
    torch.testing.assert_close(got, x[0], rtol=1e-5, atol=1e-5)
    W, D = width, text_dim
    attention = lambda kv: W * W + 2 * W * kv + 3 * W + W * W + W           # noqa: E731 q, k, v, biases, out
    ff = 2 * W + 8 * W * W + 8 * W + 4 * W * W + W                           # LayerNorm, Linear, Linear
    assert g.size == N_CTX * W + 2 * W + 2 * D + attention(D) + ff + depth * (2 * W + attention(W) + ff)


def _geglu(h):
    a, gates = h.chunk(2, dim=-1)
    return a * F.gelu(gates)


def test_heads_must_divide_the_width():
    with pytest.raises(PFedMoAPError, match=r"^fedtpg\.heads = 3: must divide the text tower's width 64$"):
        PromptGenerator(N_CTX, 64, 128, heads=3)
    with pytest.raises(PFedMoAPError, match=r"^fedtpg\.batch_size = -1"):
        config.load(None, ["algorithm=fedtpg", "fedtpg.batch_size=-1"])


def test_learning_rate_is_a_cosine_over_the_rounds():
    assert [cosine_lr(0.003, r, 4) for r in range(4)] == pytest.approx(
        [0.003, 0.0015 * (1 + math.cos(math.pi / 4)), 0.0015, 0.0015 * (1 + math.cos(3 * math.pi / 4))])


# ---------------------------------------------------------------------------- a traced run

class Trace:
    """A run in this process with the server's and clients' exchanges recorded."""

    def __init__(self, run_dir):
        self.cfg = config.load(None, SETS)
        fed = self.fed = federation.Federation(self.cfg, LocalComm())
        client, server = fed.client, fed.server
        self.fit, self.evaluate, self.aggregate, self.eval_payload = [], [], [], {}

        def rec_fit(state, data, r, c, down, _f=client.fit):
            up = _f(state, data, r, c, down)
            self.fit.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()},
                                 up={k: np.array(v) for k, v in up.items()}))
            return up

        def rec_eval(state, data, r, c, down, _f=client.evaluate):
            res = _f(state, data, r, c, down)
            self.evaluate.append(dict(r=r, c=c, down={k: np.array(v) for k, v in down.items()}, res=res))
            return res

        def rec_aggregate(r, participants, uploads, _f=server.aggregate_fit):
            _f(r, participants, uploads)
            self.aggregate.append(dict(r=r, participants=np.array(participants),
                                       uploads={k: np.array(v) for k, v in uploads.items()},
                                       after=server.generator.copy()))

        client.fit, client.evaluate, server.aggregate_fit = rec_fit, rec_eval, rec_aggregate
        fed.run(run_dir)
        self.res = store.read_results(run_dir)
        self.rounds = self.res["rounds"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return Trace(tmp_path_factory.mktemp("fedtpg") / "run")


@pytest.mark.slow
def test_what_travels_is_the_generator_nothing_class_specific(traced):
    fed = traced.fed
    gen = fed.method.generator
    P = gen.size
    assert P == PromptGenerator(N_CTX, WIDTH, EMBED).size             # fixed by the widths, not the classes
    n_classes = len(traced.res["partition"]["classnames"])
    assert gen(torch.zeros(P), torch.zeros(n_classes + 5, EMBED)).shape == (N_CTX, WIDTH)
    # nothing stays on a client: its checkpointed state is empty
    assert fed.client.state_vector(fed.states[0]).size == 0
    init = gen.init(rng.torch_generator(traced.cfg.seed, "fedtpg-init")).numpy()
    global_ = init
    part = traced.rounds["participated"].astype(bool)
    for r in range(ROUNDS):
        fits = [f for f in traced.fit if f["r"] == r]
        assert sorted(f["c"] for f in fits) == list(np.flatnonzero(part[r]))
        for f in fits:
            assert set(f["down"]) == {"global_generator"}
            np.testing.assert_array_equal(f["down"]["global_generator"], global_)    # the global network
            assert set(f["up"]) == {"generator", "n_samples"}
            up = f["up"]["generator"]
            assert up.dtype == np.float32 and up.shape == (P,)
            assert not np.array_equal(up, global_)                                   # it trained
            assert f["up"]["n_samples"][0] == traced.fed.build.n_train[f["c"]]
        agg = traced.aggregate[r]
        rows = np.stack([f["up"]["generator"] for f in sorted(fits, key=lambda f: f["c"])])
        counts = np.array([f["up"]["n_samples"][0] for f in sorted(fits, key=lambda f: f["c"])])
        want = fedavg(rows, counts)
        np.testing.assert_array_equal(agg["after"], want)
        global_ = want
        for e in (e for e in traced.evaluate if e["r"] == r):               # evaluation: the new global network
            assert set(e["down"]) == {"global_generator"}
            np.testing.assert_array_equal(e["down"]["global_generator"], global_)
    # bytes: the network's row each way (+ the 4-byte sample count up), every evaluated client gets it again
    np.testing.assert_array_equal(traced.rounds["bytes_up"], part * 4 * (P + 1))
    np.testing.assert_array_equal(traced.rounds["bytes_down"], (part.astype(int) + 1) * 4 * P)


@pytest.mark.slow
def test_every_client_is_evaluated_with_the_global_network(traced):
    fed = traced.fed
    client = fed.client
    final = traced.aggregate[-1]["after"]
    with torch.no_grad():
        text = fed.build.encoder(fed.method.generator(torch.from_numpy(final), client.class_embeddings()))
    for c in range(N):
        data = fed.build.data[c]
        pred = (data.test_x @ text.t()).argmax(-1)
        assert traced.rounds["accuracy"][-1, c] == pytest.approx(float((pred == data.test_y).float().mean()))
        down = {"global_generator": final}
        assert client.evaluate_global(fed.states[c], data, ROUNDS - 1, c, down).accuracy == \
            client.evaluate(fed.states[c], data, ROUNDS - 1, c, down).accuracy


@pytest.mark.slow
def test_the_context_depends_on_the_class_names(traced):
    """The same network on other class names generates another context; a client part built over
    an encoder of other class names (novel classes) gets them only through its encoder."""
    fed = traced.fed
    final = torch.from_numpy(traced.aggregate[-1]["after"])
    names = list(fed.build.encoder.classnames)
    other_names = ["zebra", "lighthouse", "violin", "cactus", "submarine"]
    other = PromptEncoder(fed.build.backbone, other_names, N_CTX)
    novel = fed.method.__class__(dataclasses.replace(fed.method.setup, encoder=other)).client()
    with torch.no_grad():
        ctx, ctx_other = fed.client.context(final), novel.context(final)
        emb = fed.client.class_embeddings()
        assert novel.class_embeddings().shape == (len(other_names), EMBED)
        np.testing.assert_array_equal(emb.numpy(), fed.build.backbone.encode_texts(names).cpu().numpy())
        # as a set: the same names in another order give the same context
        perm = torch.arange(len(names)).flip(0)
        torch.testing.assert_close(fed.method.generator(final, emb[perm]), ctx, rtol=1e-5, atol=1e-6)
    assert ctx.shape == ctx_other.shape == (N_CTX, WIDTH)
    assert (ctx - ctx_other).abs().max() > 1e-3
    # the novel client part evaluates the same client state on its own classes
    data = fed.build.data[0]
    novel_data = dataclasses.replace(data, test_y=data.test_y % len(other_names))
    res = novel.evaluate(fed.states[0], novel_data, ROUNDS - 1, 0, {"global_generator": final.numpy()})
    with torch.no_grad():
        text = other(ctx_other)
    want = ((data.test_x @ text.t()).argmax(-1) == novel_data.test_y).float().mean()
    assert res.accuracy == pytest.approx(float(want))


# ---------------------------------------------------------------------------- ranks and resume

def _cli(out, ranks):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + args, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return store.read_results(out)["rounds"]


@pytest.mark.slow
def test_identical_at_one_and_three_ranks(traced, tmp_path):
    if not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec beside the venv's python")
    three = _cli(tmp_path / "r3", 3)
    one = traced.rounds
    assert np.isfinite(one["accuracy"]).all()
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(three[k], one[k], err_msg=k)


@pytest.mark.slow
def test_stopped_run_resumes_exactly(traced, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config.load(None, SETS)
    fed = federation.Federation(cfg, LocalComm())
    aggregate = fed.server.aggregate_fit

    def stop_after_first(r, participants, uploads):
        aggregate(r, participants, uploads)
        if r == 0:
            federation.request_stop()

    fed.server.aggregate_fit = stop_after_first
    monkeypatch.setitem(federation._stop, "requested", False)
    assert fed.run(out).status == "stopped"
    monkeypatch.setitem(federation._stop, "requested", False)
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["round"] == 1
    assert federation.Federation(cfg, LocalComm()).run(out, "resume").status == "complete"
    got = store.read_results(out)["rounds"]
    for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(got[k], traced.rounds[k], err_msg=k)
    with h5py.File(out / "checkpoint.h5") as f:
        np.testing.assert_array_equal(f["server/generator"][()], traced.aggregate[-1]["after"])


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_server_averages_the_networks(tiny_backbone, aggregation):
    """FedAvg of the uploaded networks, by sample count (default) or the reference's plain mean
    (`fedtpg.aggregation = "uniform"`, which uploads no count)."""
    from pfedmoap import algorithms
    from pfedmoap.algorithms.base import Setup
    cfg = config.load(None, ["algorithm=fedtpg", f"prompt.n_ctx={N_CTX}", f"fedtpg.aggregation={aggregation}"])
    enc = PromptEncoder(tiny_backbone, ["a", "b", "c"], N_CTX)
    m = algorithms.get("fedtpg")(Setup(cfg, 3, enc, tiny_backbone, (N_CTX, WIDTH)))
    assert [a.name for a in m.arrays().up] == (["generator", "n_samples"] if aggregation == "samples" else ["generator"])
    server = m.server()
    rows = np.random.default_rng(0).normal(size=(2, m.generator.size)).astype(np.float32)
    uploads = {"generator": rows, "n_samples": np.array([[1.0], [3.0]], np.float32)}
    server.aggregate_fit(0, np.array([0, 2]), uploads)
    want = rows.mean(0) if aggregation == "uniform" else (rows[0] + 3 * rows[1]) / 4
    np.testing.assert_allclose(server.generator, want, rtol=1e-6, atol=1e-6)


def test_under_dp_the_whole_network_moves_within_its_sensitivity(tiny_backbone, monkeypatch):
    """dp.mechanism "gradient": every step's gradient of the whole network is clipped to dp.clip,
    and the trained upload (no noise) lies within C * S of the zero-gradient trajectory, S from
    the FedTPG schedule (fedtpg.batch_size, local_epochs, the round's learning rate)."""
    from pfedmoap import algorithms, dp
    from pfedmoap.algorithms.base import ClientData, Setup
    C, R = 0.05, 4
    cfg = config.load(None, ["algorithm=fedtpg", f"prompt.n_ctx={N_CTX}", f"rounds={R}", "fedtpg.lr=0.5",
                             "fedtpg.local_epochs=3", "fedtpg.batch_size=8", f"dp.clip={C}", "dp.noise_multiplier=0"])
    enc = PromptEncoder(tiny_backbone, ["a", "b", "c"], N_CTX)
    m = algorithms.get("fedtpg")(Setup(cfg, 2, enc, tiny_backbone, (N_CTX, WIDTH)))
    client = m.client()
    g = torch.Generator().manual_seed(0)
    n = 21                                   # 2 full batches of 8 per epoch, the last 5 dropped
    data = ClientData(F.normalize(torch.randn(n, EMBED, generator=g), dim=-1), torch.randint(3, (n,), generator=g),
                      torch.zeros(0, EMBED), torch.zeros(0, dtype=torch.long))
    start = m.server().generator
    clipped, clip = [], dp.clip_gradient_

    def spy(grad, c):
        assert grad.shape == (m.generator.size,)          # the whole network's gradient
        before = float(grad.norm())
        clip(grad, c)
        clipped.append((before, float(grad.norm())))
    monkeypatch.setattr(dp, "clip_gradient_", spy)
    round_ = 1
    lrs = client.step_lrs(n, round_)
    assert lrs == [cosine_lr(0.5, round_, R)] * 6
    up = client.fit(client.init_state(0), data, round_, 0, {"global_generator": start})["generator"]
    assert len(clipped) == len(lrs) and any(b > C for b, _ in clipped)
    assert all(a <= C * (1 + 1e-5) for _, a in clipped)
    # the zero-gradient trajectory: SGD with momentum and weight decay only
    p, buf = torch.from_numpy(start).double(), None
    for lr in lrs:
        d = 1e-5 * p
        buf = d if buf is None else 0.9 * buf + d
        p = p - lr * buf
    moved = float((torch.from_numpy(up).double() - p).norm())
    S = dp.gradient_sensitivity(lrs, 0.9, 1e-5)
    assert 0 < moved <= C * S * (1 + 1e-4)
    assert client.upload_sensitivity(n) == pytest.approx(dp.gradient_sensitivity(client.step_lrs(n, 0), 0.9, 1e-5))
