"""Issue 21: under DP every upload is the output of the DP mechanism (nothing leaves a client
unclipped or un-noised: no sample count, no gating network), and no client part is told whose
prompts it received (pFedMoAP's experts travel without ids, with or without DP)."""
from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

pytest.importorskip("dp_accounting")

from pfedmoap import algorithms, cli, dp, exchange, store  # noqa: E402

SMALL = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=6",
         "data.n_train=120", "data.n_test=30", "data.min_size=5", "data.cache_dir=", "data.augment=none",
         "data.augment_views=0", "prompt.n_ctx=4", "rounds=2", "train.local_epochs=1", "train.frac=0.5",
         "run.threads=1", "seed=3"]
MOE = ["moe.n_experts=3", "moe.participation=paper"]      # pfedmoap's own options
DP = ["dp.clip=0.5", "dp.noise_multiplier=0.8"]


@pytest.fixture
def keep_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


class Spy:
    """Records every row the DP mechanism releases, every upload and every download."""

    def __init__(self, monkeypatch):
        self.released: set[bytes] = set()
        self.noise_std: list[float] = []
        self.clipped: list[float] = []          # gradient norms after the per-step clip
        self.uploads: list[tuple[str, np.ndarray]] = []
        self.downloads: list[tuple[int, str, np.ndarray]] = []
        privatize, add_noise, clip_ = dp.privatize, dp.add_noise, dp.clip_gradient_

        def spy_privatize(prompt, clip, sigma, gen):
            out = privatize(prompt, clip, sigma, gen)
            if clip > 0:                        # clip 0: DP off, the prompt itself (not a release)
                self.noise_std.append(sigma * clip)
                self.released.add(np.asarray(out, np.float32).tobytes())
            return out

        def spy_add_noise(upload, std, gen):
            out = add_noise(upload, std, gen)
            self.noise_std.append(std)
            self.released.add(np.asarray(out, np.float32).tobytes())
            return out

        def spy_clip(grad, clip):
            clip_(grad, clip)
            self.clipped.append(float(grad.norm()) / clip)

        up, down = exchange.Transport.up, exchange.Transport.down

        def spy_up(transport, specs, participants, uploads):
            for c in sorted(uploads):
                for s in specs:
                    self.uploads.append((s.name, np.asarray(uploads[c][s.name], s.dtype).reshape(-1)))
            return up(transport, specs, participants, uploads)

        def spy_down(transport, specs, payloads):
            out, nbytes = down(transport, specs, payloads)
            for c, arrays in out.items():
                for name, a in arrays.items():
                    self.downloads.append((c, name, a))
            return out, nbytes

        monkeypatch.setattr(dp, "privatize", spy_privatize)
        monkeypatch.setattr(dp, "add_noise", spy_add_noise)
        monkeypatch.setattr(dp, "clip_gradient_", spy_clip)
        monkeypatch.setattr(exchange.Transport, "up", spy_up)
        monkeypatch.setattr(exchange.Transport, "down", spy_down)


def _run(tmp_path, sets):
    args = ["run", "--out", str(tmp_path / "run")]
    for s in [*SMALL, *(MOE if "algorithm=pfedmoap" in sets else ()), *sets]:
        args += ["--set", s]
    assert cli.main(args) == 0
    return store.read_results(tmp_path / "run")


CASES = [(m, "gradient") for m in algorithms.names()] + [("pfedmoap", "upload"), ("promptfl", "upload")]


@pytest.mark.parametrize("method,mechanism", CASES)
def test_under_dp_every_upload_is_a_release_of_the_mechanism(method, mechanism, tmp_path, keep_signals,
                                                             monkeypatch):
    spy = Spy(monkeypatch)
    res = _run(tmp_path, [f"algorithm={method}", *DP, f"dp.mechanism={mechanism}"])
    names = {name for name, _ in spy.uploads}
    assert "n_samples" not in names                     # the sample count does not travel under DP
    for name, row in spy.uploads:
        assert row.dtype == np.float32
        assert row.tobytes() in spy.released, f"{method}: upload {name!r} is not a DP release"
    a = res["attrs"]
    sigma, S = a["dp_noise_multiplier"], a["dp_sensitivity"]
    assert all(std == pytest.approx(sigma * S) and std > 0 for std in spy.noise_std)
    if res["rounds"]["bytes_up"].any():                # a method that uploads
        assert len(spy.noise_std) == res["rounds"]["participated"].sum()     # one release per participant
        assert (res["rounds"]["dp_epsilon"] > 0).all()
    else:                                   # nothing leaves a client: nothing clipped, noised or spent
        assert not spy.uploads and not spy.noise_std and not spy.clipped
        assert (res["rounds"]["dp_epsilon"] == 0).all()
        return
    if mechanism == "gradient":
        assert spy.clipped and max(spy.clipped) <= 1 + 1e-5     # every step's gradient within dp.clip
        assert S > 0 and a["dp_clip"] == 0.5
    else:
        assert not spy.clipped and S == 0.5
    _no_expert_ids(spy, method)


@pytest.mark.parametrize("method", ["pfedmoap", "promptfl"])
def test_without_dp_counts_travel_and_experts_still_come_without_ids(method, tmp_path, keep_signals, monkeypatch):
    spy = Spy(monkeypatch)
    _run(tmp_path, [f"algorithm={method}"])
    assert {name for name, _ in spy.uploads} == {"prompt", "n_samples"}
    assert not spy.released and not spy.clipped
    _no_expert_ids(spy, method)


def _no_expert_ids(spy, method):
    names = {name for _, name, _ in spy.downloads}
    assert "expert_ids" not in names
    assert all(a.dtype.kind == "f" for _, _, a in spy.downloads)     # no ids of any kind, only prompts
    if method == "pfedmoap":
        assert "experts" in names                        # the check above saw experts go down


def test_client_part_caches_experts_by_their_bytes(tiny_backbone):
    """Two clients sent the same expert row share one encoding; different rows are encoded apart."""
    from pfedmoap import config
    from pfedmoap.algorithms.base import Setup
    from pfedmoap.clip.prompt import PromptEncoder
    cfg = config.load(None, ["algorithm=pfedmoap", "prompt.n_ctx=4", "moe.n_experts=3"])
    enc = PromptEncoder(tiny_backbone, ["a", "b", "c"], 4)
    m = algorithms.get("pfedmoap")(Setup(cfg, 3, enc, tiny_backbone, (4, 64)))
    client = m.client()
    calls = []
    encode = enc.encode_frozen
    enc.encode_frozen = lambda x: calls.append(x.clone()) or encode(x)
    g = np.random.default_rng(0)
    r1, r2 = g.normal(size=(2, 256)).astype(np.float32)
    client.prepare(0, {0: {"experts": np.stack([r1, r2])}, 1: {"experts": np.stack([r2])}, 2: {}})
    assert len(calls) == 2
    assert torch.equal(client._experts[1][0], client._experts[0][1])
    assert 2 not in client._experts
    want = encode(torch.from_numpy(r1).reshape(1, 4, 64))[0]
    assert torch.equal(client._experts[0][0], want)


def test_aggregated_gate_is_refused_under_dp(tmp_path, keep_signals, capsys):
    args = ["run", "--out", str(tmp_path / "run")]
    for s in [*SMALL, *MOE, "algorithm=pfedmoap", "moe.aggregate_gate=true", *DP]:
        args += ["--set", s]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: moe.aggregate_gate = true with dp.clip > 0: the gating network would be uploaded "
                   "without clipping or noise; set moe.aggregate_gate = false to run with DP"]
    assert not (tmp_path / "run" / store.RESULTS).exists()


def test_unknown_mechanism_is_one_config_error():
    from pfedmoap import config
    from pfedmoap.errors import PFedMoAPError
    with pytest.raises(PFedMoAPError, match=r"^dp\.mechanism = 'noise': expected one of gradient, upload$"):
        config.load(None, ["dp.mechanism=noise", "dp.clip=1"])
    assert config.load(None, []).dp.mechanism == "gradient"          # the paper's, by default
