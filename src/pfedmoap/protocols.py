"""Evaluation protocols (`eval.protocol`; docs/protocols.md): what a round reports besides each
client's accuracy on its own test split, for every method alike.

- "personal" (the default): that accuracy only.
- "base2novel": the classes are split by label into base (the first ceil(C/2)) and novel (the rest);
  the run trains on the base classes only (its data set, partition and class names are the base
  classes'), and each evaluated client's model is also scored on the test images of every base class
  (Base) and of every novel class with the novel class names (Novel); the method's global model, where
  it has one, on both too.
- "leave_one_domain_out": the run trains on every domain but `eval.held_out`; each client's model is
  also scored on the held-out domain's test images.
- "cross_dataset": each client's model is also scored on each `eval.targets` data set's test images,
  with that data set's class names.
- "dual": the method's global model, where it has one, on each client's own test split.

A set of other class names is evaluated by a second client part of the same method, built over an
encoder of those names (`Evaluator`); it is given the client states and the round's downloads and
never trains on anything but the run's own (training) classes. This module knows no method.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .data.base import FederatedDataset, ImageSplit
from .errors import PFedMoAPError
from .store import Field


def take(split: ImageSplit, idx, labels=None, domains=None) -> ImageSplit:
    """The images `idx` of `split` (their keys, files and content id kept for the feature cache),
    with new `labels` / `domains` when given."""
    idx = np.asarray(idx, np.int64)
    load = split.load
    out = ImageSplit(lambda i: load(int(idx[i])), split.labels[idx] if labels is None else labels,
                     split.domains[idx] if domains is None else domains, [split.keys[i] for i in idx],
                     files=None if split.files is None else [split.files[i] for i in idx],
                     identity=split.identity)
    return out


@dataclass
class EvalSet:
    """Test images a protocol scores every evaluated client's model on."""
    name: str                       # "base", "novel", "held_out", or a target data set's name
    dataset: FederatedDataset       # its test split is scored; its class names give the text
    same_classes: bool              # the run's training class names: the run's own client part scores it


@dataclass(frozen=True)
class Column:
    """One value per evaluated client: `field[index]`, the accuracy on set `set` (None: the
    client's own test split) of its personal model or, with `global_`, of the method's global one."""
    field: str
    index: int
    set: int | None
    global_: bool


@dataclass
class Protocol:
    name: str
    train: FederatedDataset                     # what the run trains (and partitions) on
    sets: list[EvalSet] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    fields: dict[str, Field] = field(default_factory=dict)     # results.h5 /rounds/<name>
    attrs: dict = field(default_factory=dict)                  # results.h5 root attributes

    @property
    def width(self) -> int:
        return len(self.columns)


def _field(description: str, shape=()) -> Field:
    return Field(np.float32, "fraction", description, tuple(shape))


def base_novel_split(n_classes: int) -> int:
    """The number of base classes: the first ceil(C/2) labels (CoOp's subsample_classes, as FedPGP's
    and pFedMMA's code, and FLiP's split_base_new over sorted class names)."""
    return math.ceil(n_classes / 2)


def _base2novel(ds: FederatedDataset) -> Protocol:
    C = ds.n_classes
    if C < 2:
        raise PFedMoAPError(f"eval.protocol = 'base2novel': data set {ds.name!r} has {C} class; expected >= 2")
    m = base_novel_split(C)
    tr, te = np.flatnonzero(ds.train.labels < m), np.flatnonzero(ds.test.labels < m)
    novel_te = np.flatnonzero(ds.test.labels >= m)
    # base labels are 0..m-1 already; novel labels are relabelled 0..C-m-1 in the novel names' order
    base = FederatedDataset(ds.name, ds.classnames[:m], take(ds.train, tr), take(ds.test, te),
                            list(ds.domain_names), None if ds.superclass is None else ds.superclass[:m])
    novel = FederatedDataset(ds.name, ds.classnames[m:], take(ds.train, np.zeros(0, np.int64)),
                             take(ds.test, novel_te, labels=ds.test.labels[novel_te] - m),
                             list(ds.domain_names))
    return Protocol(
        "base2novel", base,
        sets=[EvalSet("base", base, True), EvalSet("novel", novel, False)],
        columns=[Column("base_accuracy", 0, 0, False), Column("novel_accuracy", 0, 1, False),
                 Column("global_base_accuracy", 0, 0, True), Column("global_novel_accuracy", 0, 1, True)],
        fields={
            "base_accuracy": _field("base2novel: the client's model on the test images of every base class "
                                    "(text from the base class names)"),
            "novel_accuracy": _field("base2novel: the client's model on the test images of every novel class "
                                     "(text from the novel class names, never trained on)"),
            "global_base_accuracy": _field("base2novel: the method's global model on the test images of every "
                                           "base class; NaN for a method without one"),
            "global_novel_accuracy": _field("base2novel: the method's global model on the test images of every "
                                            "novel class (novel class names); NaN for a method without one"),
        },
        attrs={"base_classes": list(ds.classnames[:m]), "novel_classes": list(ds.classnames[m:])})


def _leave_one_domain_out(ds: FederatedDataset, held: str) -> Protocol:
    if held not in ds.domain_names:
        raise PFedMoAPError(f"eval.held_out = {held!r}: not a domain of data set {ds.name!r} as loaded; "
                            f"expected one of {list(ds.domain_names)}")
    if len(ds.domain_names) < 2:
        raise PFedMoAPError(f"eval.held_out = {held!r}: data set {ds.name!r} has no other domain to train on "
                            f"(data.domains lists only it?)")
    d = ds.domain_names.index(held)
    rest = [n for n in ds.domain_names if n != held]
    remap = np.array([rest.index(n) if n != held else -1 for n in ds.domain_names], np.int64)

    def without(split):
        keep = np.flatnonzero(split.domains != d)
        return take(split, keep, domains=remap[split.domains[keep]])

    train = FederatedDataset(ds.name, list(ds.classnames), without(ds.train), without(ds.test), rest,
                             ds.superclass)
    te = np.flatnonzero(ds.test.domains == d)
    if len(te) == 0:
        raise PFedMoAPError(f"eval.held_out = {held!r}: data set {ds.name!r} has no test image of that domain")
    held_set = FederatedDataset(ds.name, list(ds.classnames), take(ds.train, np.zeros(0, np.int64)),
                                take(ds.test, te, domains=np.zeros(len(te), np.int64)), [held])
    return Protocol(
        "leave_one_domain_out", train, sets=[EvalSet("held_out", held_set, True)],
        columns=[Column("held_out_accuracy", 0, 0, False)],
        fields={"held_out_accuracy": _field("leave_one_domain_out: the client's model on the test images of "
                                            "the held-out domain (root attr eval_held_out), never trained on")},
        attrs={"eval_held_out": held})


def _cross_dataset(ds: FederatedDataset, targets: list[str], load) -> Protocol:
    sets = [EvalSet(t, load(t), False) for t in targets]
    return Protocol(
        "cross_dataset", ds, sets=sets,
        columns=[Column("target_accuracy", i, i, False) for i in range(len(sets))],
        fields={"target_accuracy": _field("cross_dataset: the client's model on each target data set's test "
                                          "images with its class names, in root attr eval_targets' order",
                                          (len(sets),))},
        attrs={"eval_targets": list(targets)})


def _dual(ds: FederatedDataset) -> Protocol:
    return Protocol("dual", ds, columns=[Column("global_accuracy", 0, None, True)],
                    fields={"global_accuracy": _field("dual: the method's global model on the client's own test "
                                                      "split; NaN for a method without one")})


def build(cfg, dataset: FederatedDataset, load_target) -> Protocol:
    """The protocol of `cfg.eval` over the loaded data set. load_target(name) -> FederatedDataset:
    a cross-dataset target."""
    e = cfg.eval
    if e.protocol == "base2novel":
        p = _base2novel(dataset)
    elif e.protocol == "leave_one_domain_out":
        p = _leave_one_domain_out(dataset, e.held_out)
    elif e.protocol == "cross_dataset":
        p = _cross_dataset(dataset, list(e.targets), load_target)
    elif e.protocol == "dual":
        p = _dual(dataset)
    else:
        return Protocol("personal", dataset)
    p.attrs = {"eval_protocol": p.name, **p.attrs}
    return p


class Evaluator:
    """A rank's scoring of its evaluated clients on a protocol's sets.

    A set with the training class names is scored by the run's own client part; a set with other
    names by a client part of the same method built over an encoder of those names (its training
    encoder stays the run's), made afresh every evaluated round (so that nothing it caches outlives
    a client's training) and given the round's downloads as the run's part is (`prepare`)."""

    def __init__(self, protocol: Protocol, method, encoders: dict[int, object], data: dict[int, tuple]):
        self.protocol, self.method = protocol, method
        self.encoders = encoders          # set index -> PromptEncoder of its class names
        self.data = data                  # set index -> (test_x, test_y, test_dense or None, ClientImages or None)
        self._round, self._parts = None, {}

    def begin_round(self, round_: int, downloads: list[dict]) -> None:
        """The client parts of this round's other class names, prepared with its downloads (fit,
        then evaluation: in the order the run's own part got them)."""
        self._round, self._parts = round_, {}
        setup = self.method.setup
        for i, enc in self.encoders.items():
            other = type(self.method)(dataclasses.replace(setup, encoder=enc, train_encoder=setup.encoder))
            part = other.client()
            for d in downloads:
                part.prepare(round_, d)
            self._parts[i] = part

    def evaluate(self, client, round_: int, cids: list[int], states: list, datas: list, downs: list) -> np.ndarray:
        """(len(cids), width) accuracies of one block of clients; NaN where a value does not exist
        (a method without a global model, an empty test set)."""
        cols = self.protocol.columns
        out = np.full((len(cids), len(cols)), np.nan, np.float32)
        for s in dict.fromkeys(c.set for c in cols):
            part = client if s is None or self.protocol.sets[s].same_classes else self._parts[s]
            if s is None:
                sdatas = datas
            else:
                x, y, dense, images = self.data[s]
                more = {} if images is None else {"images": images}
                sdatas = [dataclasses.replace(d, test_x=x, test_y=y, test_dense=dense, **more) for d in datas]
            for j, c in enumerate(cols):
                if c.set != s:
                    continue
                if not c.global_:
                    results = part.evaluate_block(states, sdatas, round_, cids, downs)
                    out[:, j] = [r.accuracy for r in results]
                else:
                    for k, (st, d, cid, dn) in enumerate(zip(states, sdatas, cids, downs)):
                        r = part.evaluate_global(st, d, round_, cid, dn)
                        out[k, j] = np.nan if r is None else r.accuracy
        return out
