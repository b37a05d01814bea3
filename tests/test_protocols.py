"""Evaluation protocols (issue 22, eval.protocol; docs/protocols.md): what each one trains on and
scores, checked on the data the client parts receive."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pfedmoap import comm, config, federation, protocols, store
from pfedmoap.algorithms import base as method_base
from pfedmoap.algorithms.base import ClientData, EvalResult, Setup
from pfedmoap.analysis.protocols import harmonic_mean, protocol_table, run_metrics
from pfedmoap.analysis.runs import Run, load_run
from pfedmoap.data import digits
from pfedmoap.data.base import FederatedDataset, ImageSplit
from pfedmoap.errors import PFedMoAPError

TINY = ["model.name=tiny-clip", "model.pretrained=", "data.cache_dir=", "rounds=1", "train.local_epochs=1",
        "run.threads=1", "prompt.n_ctx=4", "run.progress=false", "run.checkpoint_every=0", "data.min_size=2"]
DIGITS = TINY + ["data.dataset=digits", "data.domains=original,noise"]


def _cfg(*sets):
    return config.load(None, [*sets])


def _tiny_dataset(train_labels, test_labels, names):
    img = lambda n: np.zeros((n, 4, 4), np.uint8)  # noqa: E731
    return FederatedDataset("tiny", list(names), ImageSplit.from_arrays(img(len(train_labels)), train_labels),
                            ImageSplit.from_arrays(img(len(test_labels)), test_labels))


# ----------------------------------------------------------------------------- base-to-novel by hand

class _Part:
    """A client part that predicts class 0 of whatever class list its encoder holds."""

    def __init__(self, method):
        self.encoder = method.setup.encoder
        self.train_encoder = method.setup.train_encoder or self.encoder
        method.made.append(self)

    def prepare(self, round_, downloads):
        pass

    def evaluate_block(self, states, datas, round_, cids, downs):
        return [EvalResult(float((d.test_y == 0).float().mean()), 0.0, 0.0) for d in datas]

    def evaluate_global(self, *args):
        return None


class _Method:
    made: list = []

    def __init__(self, setup):
        self.setup = setup

    def client(self):
        return _Part(self)


def test_base_novel_split_and_scores_by_hand():
    # C = 5: base = the first ceil(5/2) = 3 labels, novel = labels 3, 4 (relabelled 0, 1)
    ds = _tiny_dataset([0, 1, 2, 3, 4, 0], [0, 0, 1, 2, 3, 3, 3, 4], ["c0", "c1", "c2", "c3", "c4"])
    p = protocols.build(SimpleNamespace(eval=SimpleNamespace(protocol="base2novel", held_out="", targets=[])),
                        ds, None)
    assert p.train.classnames == ["c0", "c1", "c2"]
    assert p.train.train.labels.tolist() == [0, 1, 2, 0] and p.train.test.labels.tolist() == [0, 0, 1, 2]
    novel = p.sets[1].dataset
    assert novel.classnames == ["c3", "c4"] and novel.test.labels.tolist() == [0, 0, 0, 1]
    assert len(novel.train) == 0
    assert p.attrs == {"eval_protocol": "base2novel", "base_classes": ["c0", "c1", "c2"], "novel_classes": ["c3", "c4"]}

    enc = lambda names: SimpleNamespace(classnames=list(names))  # noqa: E731
    setup = Setup(cfg=None, n_clients=1, encoder=enc(p.train.classnames), backbone=None, ctx_shape=(1, 1))
    _Method.made = []
    method = _Method(setup)
    data = {i: (torch.zeros(len(s.dataset.test), 2), torch.from_numpy(s.dataset.test.labels), None, None)
            for i, s in enumerate(p.sets)}
    ev = protocols.Evaluator(p, method, {1: enc(novel.classnames)}, data)
    ev.begin_round(0, [{}, {}])
    own = ClientData(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2),
                     torch.zeros(1, dtype=torch.long))
    out = ev.evaluate(method.client(), 0, [0], [None], [own], [{}])
    # Base: label 0 in [0, 0, 1, 2] = 2/4; Novel: (relabelled) 0 in [0, 0, 0, 1] = 3/4; no global model
    np.testing.assert_allclose(out[0, :2], [0.5, 0.75])
    assert np.isnan(out[0, 2:]).all()
    novel_part = _Method.made[0]
    assert novel_part.encoder.classnames == ["c3", "c4"] and novel_part.train_encoder.classnames == ["c0", "c1", "c2"]
    assert harmonic_mean(0.5, 0.75) == pytest.approx(0.6)


def test_hm_is_of_the_client_means():
    rounds = {"accuracy": np.array([[0.9, 0.7]], np.float32), "evaluated": np.ones((1, 2), bool),
              "base_accuracy": np.array([[0.4, 0.6]], np.float32),
              "novel_accuracy": np.array([[1.0, 0.5]], np.float32),
              "global_base_accuracy": np.full((1, 2), np.nan, np.float32),
              "global_novel_accuracy": np.full((1, 2), np.nan, np.float32)}
    run = Run(Path("x/results.h5"), {"eval_protocol": "base2novel", "schema_version": 3}, {}, {}, rounds, "complete")
    m = run_metrics(run)
    assert m["Local"] == pytest.approx(0.8) and m["Base"] == pytest.approx(0.5) and m["Novel"] == pytest.approx(0.75)
    assert m["HM"] == pytest.approx(0.6)          # not the mean of the clients' HMs (0.558...)
    assert np.isnan(m["global HM"])


# ----------------------------------------------------------------------------- base-to-novel on digits

@pytest.fixture(scope="module")
def b2n(tmp_path_factory):
    """promptfl_ft under base2novel (its evaluation fine-tunes: also on the novel part), every
    local training recorded: which class names it trained with, which labels it saw."""
    calls = []
    orig = method_base.ClientPart.local_train

    def spy(self, groups, loss, data, round_, cid, **kw):
        calls.append((list(self.train_encoder.classnames), list(self.encoder.classnames),
                      sorted(set(data.train_y.tolist())), kw.get("purpose", "batches")))
        return orig(self, groups, loss, data, round_, cid, **kw)
    encoded = []            # the class names of every text encoding that builds a graph (training)
    from pfedmoap.clip.prompt import PromptEncoder
    call, block = PromptEncoder.__call__, PromptEncoder.encode_block

    def spy_call(self, *a, **kw):
        if torch.is_grad_enabled():
            encoded.append(list(self.classnames))
        return call(self, *a, **kw)

    def spy_block(self, *a, **kw):
        if torch.is_grad_enabled():
            encoded.append(list(self.classnames))
        return block(self, *a, **kw)
    method_base.ClientPart.local_train = spy
    PromptEncoder.__call__, PromptEncoder.encode_block = spy_call, spy_block
    try:
        out = tmp_path_factory.mktemp("b2n")
        cfg = _cfg(*DIGITS, "algorithm=promptfl_ft", "data.n_clients=3", "eval.protocol=base2novel")
        fed = federation.Federation(cfg, comm.LocalComm())
        fed.run(out, "overwrite")
    finally:
        method_base.ClientPart.local_train = orig
        PromptEncoder.__call__, PromptEncoder.encode_block = call, block
    calls.append(encoded)
    return fed, out, calls


def test_base2novel_no_novel_class_reaches_training(b2n):
    fed, out, calls = b2n
    *calls, encoded = calls
    base, novel = digits.CLASSNAMES[:5], digits.CLASSNAMES[5:]
    # every text encoding under autograd (training, the fine-tuning of the novel part included)
    # read the base class names only
    assert encoded and all(names == base for names in encoded)
    b = fed.build
    assert b.dataset.classnames == base and b.encoder.classnames == base
    assert fed.client.encoder.classnames == base
    # every training image the partition hands out is of a base class, by its key in the full data set
    full = digits.build(SimpleNamespace(domains=["original", "noise"]))
    label_of = dict(zip(full.train.keys, full.train.labels.tolist()))
    for c in range(fed.N):
        keys = [b.dataset.train.keys[i] for i in b.partition.train[c]]
        assert keys and all(label_of[k] < 5 for k in keys)
        assert int(b.data[c].train_y.max()) < 5
    # every local training (the round's and the evaluation's fine-tuning, for Base and Novel alike)
    # trained with the base class names on base labels
    purposes = {p for *_, p in calls}
    assert purposes == {"batches", "finetune"}
    assert any(enc == novel for _, enc, _, _ in calls)        # the novel part fine-tuned (with base names)
    for train_names, _, labels, _ in calls:
        assert train_names == base and set(labels) <= set(range(5))


def test_base2novel_results(b2n):
    fed, out, _ = b2n
    with store.h5py.File(Path(out) / "results.h5") as f:
        assert f.attrs["eval_protocol"] == "base2novel"
        assert list(f.attrs["base_classes"]) == digits.CLASSNAMES[:5]
        assert list(f.attrs["novel_classes"]) == digits.CLASSNAMES[5:]
        for k in ("base_accuracy", "novel_accuracy", "global_base_accuracy", "global_novel_accuracy"):
            d = f["rounds"][k]
            assert d.shape == (1, 3) and d.dtype == np.float32
            assert d.attrs["units"] == "fraction" and d.attrs["description"]
            assert np.isfinite(d[()]).all(), k
        # the global prompt is the same model for every client: one Base and one Novel value
        assert len(set(f["rounds"]["global_base_accuracy"][0].tolist())) == 1
    text = protocol_table([load_run(out)])
    assert "eval.protocol = base2novel" in text and "HM" in text and "global Novel" in text


# ----------------------------------------------------------------------------- leave one domain out

def test_leave_one_domain_out_never_trains_on_held_out(tmp_path):
    cfg = _cfg(*TINY, "data.dataset=digits", "data.domains=original,noise,blur", "data.partition=domain",
               "data.n_clients=2", "algorithm=local", "eval.protocol=leave_one_domain_out", "eval.held_out=noise")
    fed = federation.Federation(cfg, comm.LocalComm())
    b = fed.build
    assert b.dataset.domain_names == ["original", "blur"]
    for c in range(2):
        keys = [b.dataset.train.keys[i] for i in b.partition.train[c]]
        assert keys and not any("/noise/" in k for k in keys)
        assert {k.split("/")[1] for k in keys} == {["original", "blur"][c]}
    held = b.protocol.sets[0].dataset
    assert {k.split("/")[1] for k in held.test.keys} == {"noise"}
    assert len(held.test) == len(digits.split_indices()["test"])
    fed.run(tmp_path, "overwrite")
    rd = store.read_results(tmp_path)
    assert rd["attrs"]["eval_held_out"] == "noise"
    assert rd["rounds"]["held_out_accuracy"].shape == (1, 2)
    assert np.isfinite(rd["rounds"]["held_out_accuracy"]).all()


def test_held_out_must_be_a_loaded_domain():
    cfg = _cfg(*DIGITS, "algorithm=local", "data.n_clients=2", "eval.protocol=leave_one_domain_out",
               "eval.held_out=mirror")
    with pytest.raises(PFedMoAPError, match="eval.held_out = 'mirror': not a domain of data set 'digits'"):
        federation.Federation(cfg, comm.LocalComm())


@pytest.mark.parametrize("sets, message", [
    (["eval.protocol=leave_one_domain_out"], "needs eval.held_out"),
    (["eval.held_out=noise"], "only for eval.protocol = 'leave_one_domain_out'"),
    (["eval.protocol=cross_dataset"], "needs eval.targets"),
    (["eval.targets=synthetic"], "only for eval.protocol = 'cross_dataset'"),
    (["eval.protocol=cross_dataset", "eval.targets=nosuch"], "'nosuch' is not a data set"),
])
def test_protocol_keys_are_checked(sets, message):
    with pytest.raises(PFedMoAPError, match=message):
        _cfg(*sets)


def test_default_keys_leave_the_run_hash_alone():
    plain = config.Config()
    assert "eval" not in config._identity(plain)
    changed = config.load(None, ["eval.protocol=cross_dataset", "eval.targets=synthetic"])
    assert config.run_hash(changed) != config.run_hash(plain)


# ----------------------------------------------------------------------------- cross data set

def test_cross_dataset_scores_with_the_target_class_names(tmp_path, monkeypatch):
    made = []
    orig = protocols.Evaluator.begin_round

    def spy(self, round_, downloads):
        orig(self, round_, downloads)
        made.extend((i, part.encoder.classnames, part.train_encoder.classnames) for i, part in self._parts.items())
    monkeypatch.setattr(protocols.Evaluator, "begin_round", spy)
    cfg = _cfg(*DIGITS, "algorithm=pfedmoap", "data.n_clients=3", "eval.protocol=cross_dataset",
               "eval.targets=synthetic", "data.n_classes=3", "data.n_test=30")
    fed = federation.Federation(cfg, comm.LocalComm())
    fed.run(tmp_path, "overwrite")
    assert made == [(0, ["pattern 0", "pattern 1", "pattern 2"], digits.CLASSNAMES)]
    x, y, _, _ = fed.build.evaluator.data[0]
    assert len(y) == 30 and set(y.tolist()) == {0, 1, 2}
    rd = store.read_results(tmp_path)
    assert list(rd["attrs"]["eval_targets"]) == ["synthetic"]
    acc = rd["rounds"]["target_accuracy"]
    assert acc.shape == (1, 3, 1) and np.isfinite(acc).all()


# ----------------------------------------------------------------------------- dual

@pytest.mark.parametrize("name", ["pfedmoap", "promptfl"])
def test_dual_global_accuracy(tmp_path, name):
    cfg = _cfg(*TINY, "data.dataset=synthetic", "data.n_train=120", "data.n_test=60", "data.n_clients=3",
               f"algorithm={name}", "eval.protocol=dual")
    federation.Federation(cfg, comm.LocalComm()).run(tmp_path, "overwrite")
    r = store.read_results(tmp_path)["rounds"]
    if name == "pfedmoap":                  # no global model: NaN
        assert np.isnan(r["global_accuracy"]).all()
    else:                                   # PromptFL's personal model is its global prompt
        assert np.isfinite(r["global_accuracy"]).all()
        np.testing.assert_array_equal(r["global_accuracy"], r["accuracy"])


# ----------------------------------------------------------------------------- 1 vs 3 ranks

MPIEXEC = Path(__import__("sys").executable).parent / "mpiexec"
MPI_SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_classes=6",
            "data.n_clients=4", "data.n_train=240", "data.n_test=120", "data.min_size=5", "data.cache_dir=",
            "rounds=2", "train.local_epochs=1", "train.frac=0.5", "run.threads=1", "prompt.n_ctx=4",
            "run.progress=false", "eval.protocol=base2novel"]


@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory):
    import os
    import subprocess
    import sys
    base = tmp_path_factory.mktemp("b2n_mpi")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = {}
    for name, extra in (("pfedmoap", ["moe.n_experts=2"]), ("promptfl", [])):
        for ranks in (0, 3):
            d = base / f"{name}{ranks}"
            cmd = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(d)]
            for s in MPI_SETS + [f"algorithm={name}", *extra]:
                cmd += ["--set", s]
            cmd = [str(MPIEXEC), "-n", str(ranks), *cmd] if ranks else cmd
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            assert p.returncode == 0, p.stderr[-3000:]
            out[name, ranks] = d
    return out


@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the venv's python")
@pytest.mark.parametrize("name", ["pfedmoap", "promptfl"])
def test_base2novel_identical_on_1_and_3_ranks(mpi_runs, name):
    one, three = (store.read_results(mpi_runs[name, r])["rounds"] for r in (0, 3))
    keys = ["accuracy", "base_accuracy", "novel_accuracy", "global_base_accuracy", "global_novel_accuracy"]
    for k in keys + ["participated", "bytes_up", "bytes_down"]:
        np.testing.assert_array_equal(one[k], three[k], err_msg=f"{name}: {k}")
    assert np.isfinite(one["novel_accuracy"]).all()
    assert np.isfinite(one["global_novel_accuracy"]).all() == (name == "promptfl")


# ----------------------------------------------------------------------------- resume

def test_a_stopped_base2novel_run_resumes_exactly(tmp_path, monkeypatch):
    sets = [*TINY, "data.dataset=synthetic", "data.n_classes=5", "data.n_train=120", "data.n_test=60",
            "data.n_clients=3", "algorithm=promptfl", "eval.protocol=base2novel", "rounds=3",
            "run.checkpoint_every=1"]
    whole = tmp_path / "whole"
    federation.Federation(_cfg(*sets), comm.LocalComm()).run(whole, "overwrite")
    orig = federation.Federation._round

    def stop_after_first(self, r):
        orig(self, r)
        federation._stop["requested"] = r == 0
    monkeypatch.setattr(federation.Federation, "_round", stop_after_first)
    part = tmp_path / "part"
    try:
        assert federation.Federation(_cfg(*sets), comm.LocalComm()).run(part, "overwrite").status == "stopped"
    finally:
        federation._stop["requested"] = False
    monkeypatch.setattr(federation.Federation, "_round", orig)
    assert federation.Federation(_cfg(*sets), comm.LocalComm()).run(part, "resume").status == "complete"
    a, b = store.read_results(whole), store.read_results(part)
    assert list(b["attrs"]["novel_classes"]) == ["pattern 3", "pattern 4"]
    for k in ("accuracy", "base_accuracy", "novel_accuracy", "global_base_accuracy", "global_novel_accuracy"):
        assert b["rounds"][k].shape == (3, 3)
        np.testing.assert_array_equal(a["rounds"][k], b["rounds"][k], err_msg=k)


def test_a_method_training_the_image_tower_scores_the_novel_images(tmp_path):
    """pfedmma (DataNeeds.images) reads the test images themselves: under base2novel its Novel
    score comes from the novel-class images, handed to it beside their features."""
    cfg = _cfg(*DIGITS, "algorithm=pfedmma", "data.n_clients=2", "eval.protocol=base2novel")
    fed = federation.Federation(cfg, comm.LocalComm())
    fed.run(tmp_path, "overwrite")
    _, y, _, images = fed.build.evaluator.data[1]
    assert images is not None and len(images.test) == len(y) > 0
    novel = store.read_results(tmp_path)["rounds"]["novel_accuracy"][-1]
    assert np.isfinite(novel).all() and (novel > 0).all()
