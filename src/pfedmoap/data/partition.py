"""Client partitions: pure, seeded functions of labels (and domains), a seed and N.

Every function returns a `Partition` of sorted int64 index arrays, one per client, into the data
set's train and test splits. No global RNG is touched: each draw uses a numpy Generator seeded from
(seed, "partition", method[, purpose]). Within a split every index belongs to at most one client.

Methods (as in FedOTP / pFedMoAP):
- iid:                  shuffle, split evenly; test split the same way.
- dirichlet:            per class, proportions ~ Dir(beta) over clients (capped at the mean client
                        size, NIID-Bench style), redrawn until every client has >= min_size training
                        images; each class's test images are split with the realised train shares.
- dirichlet-superclass: the same over super-classes (CIFAR-100: 20 coarse labels).
- pathological:         seeded class shuffle, disjoint blocks of classes_per_client classes;
                        test = all test images of the owned classes.
- domain:               one client per domain, or Dirichlet(beta) over clients_per_domain clients
                        inside each domain (test images of the domain split with the same shares).
- shots > 0:            every client keeps at most `shots` training images per class (seeded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PFedMoAPError
from ..rng import key as _key

PARTITIONS: dict = {}        # the registry: data.partition name -> builder(dataset, cfg, seed)


def register(name: str):
    def deco(fn):
        PARTITIONS[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return list(PARTITIONS)
MAX_DIRICHLET_TRIES = 1000


@dataclass
class Partition:
    train: list[np.ndarray]   # per client: sorted int64 indices into dataset.train
    test: list[np.ndarray]    # per client: sorted int64 indices into dataset.test

    @property
    def n_clients(self) -> int:
        return len(self.train)

    def train_sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.train], np.int64)

    def test_sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.test], np.int64)


# --------------------------------------------------------------------------- helpers

def _rng(seed: int, *purpose: str) -> np.random.Generator:
    """Generator keyed by (seed, "partition/<method>[/<purpose>]") — no global state (see rng.py)."""
    return np.random.default_rng(_key(int(seed), "/".join(("partition",) + purpose)))


def _as_labels(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise PFedMoAPError(f"{name}: expected a 1-d array of integer labels, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _check_n_clients(n_clients: int) -> int:
    if not isinstance(n_clients, (int, np.integer)) or isinstance(n_clients, bool) or n_clients < 1:
        raise PFedMoAPError(f"data.n_clients = {n_clients!r}: expected an integer >= 1")
    return int(n_clients)


def _check_beta(beta: float) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        b = float("nan")
    if not (b > 0 and np.isfinite(b)):
        raise PFedMoAPError(f"data.beta = {beta!r}: expected a finite number > 0 (Dirichlet concentration)")
    return b


def _check_min_size(min_size: int) -> int:
    if not isinstance(min_size, (int, np.integer)) or isinstance(min_size, bool) or min_size < 0:
        raise PFedMoAPError(f"data.min_size = {min_size!r}: expected an integer >= 0")
    return int(min_size)


def _check_shots(shots: int) -> int:
    if not isinstance(shots, (int, np.integer)) or isinstance(shots, bool) or shots < 0:
        raise PFedMoAPError(f"data.shots = {shots!r}: expected an integer >= 0 (0 = all images)")
    return int(shots)


def _sorted(idx) -> np.ndarray:
    return np.sort(np.asarray(idx, dtype=np.int64))


def _split_by_shares(idx: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    """Split `idx` (already shuffled) into len(shares) consecutive disjoint pieces, sizes ∝ shares."""
    s = np.asarray(shares, dtype=np.float64)
    tot = s.sum()
    if tot <= 0:
        return [idx[:0] for _ in s]
    cuts = (np.cumsum(s / tot) * len(idx)).astype(np.int64)[:-1]
    return np.split(idx, cuts)


def _dirichlet_core(groups: np.ndarray, n_clients: int, beta: float, min_size: int,
                    rng: np.random.Generator, what: str) -> tuple[list[np.ndarray], np.ndarray]:
    """NIID-Bench / FedOTP label-Dirichlet split of positions 0..len(groups)-1.

    Returns (per-client position arrays, shares[n_groups, n_clients] = realised counts)."""
    n = len(groups)
    if n < n_clients * min_size:
        raise PFedMoAPError(
            f"data.min_size = {min_size}: {what} has {n} training images, fewer than "
            f"n_clients ({n_clients}) x min_size; lower data.min_size or data.n_clients")
    uniq = np.unique(groups)
    by_group = [np.flatnonzero(groups == g) for g in uniq]
    cap = n / n_clients
    for _ in range(MAX_DIRICHLET_TRIES):
        batches: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, np.int64)
        counts = np.zeros((len(uniq), n_clients), np.int64)
        for gi, pos in enumerate(by_group):
            pos = rng.permutation(pos)
            p = rng.dirichlet(np.full(n_clients, beta))
            p = p * (sizes < cap)            # clients already at the mean size get no more
            if p.sum() <= 0:                 # (all capped: impossible in exact arithmetic)
                p = np.ones(n_clients)
            for j, piece in enumerate(_split_by_shares(pos, p)):
                batches[j].append(piece)
                sizes[j] += len(piece)
                counts[gi, j] = len(piece)
        if sizes.min() >= min_size:
            out = [np.concatenate(b) if b else np.zeros(0, np.int64) for b in batches]
            return out, counts
    raise PFedMoAPError(
        f"data.min_size = {min_size}: no Dirichlet(beta={beta}) draw over {n_clients} clients gave every "
        f"client >= {min_size} training images of {what} in {MAX_DIRICHLET_TRIES} tries; "
        f"raise data.beta or lower data.min_size / data.n_clients")


def _split_test_like_train(test_groups: np.ndarray, uniq_train: np.ndarray, counts: np.ndarray,
                           n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split each group's test positions across clients with that group's realised train shares.

    A group absent from train has no shares: its test images go to no client."""
    row = {int(g): i for i, g in enumerate(uniq_train)}
    out: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for g in np.unique(test_groups):
        if int(g) not in row:
            continue
        pos = rng.permutation(np.flatnonzero(test_groups == g))
        for j, piece in enumerate(_split_by_shares(pos, counts[row[int(g)]])):
            out[j].append(piece)
    return [np.concatenate(o) if o else np.zeros(0, np.int64) for o in out]


# --------------------------------------------------------------------------- methods

def split_iid(train_labels, test_labels, n_clients: int, seed: int) -> Partition:
    """Shuffle and split evenly (sizes differ by at most one); the test split the same way."""
    n_clients = _check_n_clients(n_clients)
    ytr, yte = _as_labels(train_labels, "train labels"), _as_labels(test_labels, "test labels")
    for name, y in (("training", ytr), ("test", yte)):
        if len(y) < n_clients:
            raise PFedMoAPError(f"data.n_clients = {n_clients}: the data set has only {len(y)} "
                                f"{name} images; expected at least one per client")
    rng = _rng(seed, "iid")
    tr = np.array_split(rng.permutation(len(ytr)), n_clients)
    te = np.array_split(rng.permutation(len(yte)), n_clients)
    return Partition([_sorted(t) for t in tr], [_sorted(t) for t in te])


def split_dirichlet(train_labels, test_labels, n_clients: int, beta: float, seed: int,
                    min_size: int = 10) -> Partition:
    """Per-class Dirichlet(beta) over clients (redrawn until every client has >= min_size
    training images); each class's test images split across clients with the same shares."""
    n_clients, beta, min_size = _check_n_clients(n_clients), _check_beta(beta), _check_min_size(min_size)
    ytr, yte = _as_labels(train_labels, "train labels"), _as_labels(test_labels, "test labels")
    rng = _rng(seed, "dirichlet")
    tr, counts = _dirichlet_core(ytr, n_clients, beta, min_size, rng, "the data set")
    te = _split_test_like_train(yte, np.unique(ytr), counts, n_clients, rng)
    return Partition([_sorted(t) for t in tr], [_sorted(t) for t in te])


def split_dirichlet_superclass(train_labels, test_labels, superclass, n_clients: int, beta: float,
                               seed: int, min_size: int = 10) -> Partition:
    """Dirichlet over super-classes: every fine class follows its super-class's client shares.

    superclass: array mapping class id -> super-class id (CIFAR-100: 100 -> 20)."""
    if superclass is None:
        raise PFedMoAPError("data.partition = 'dirichlet-superclass': this data set has no "
                            "super-classes; expected a data set with a class -> super-class map (cifar100)")
    sc = np.asarray(superclass, dtype=np.int64)
    ytr, yte = _as_labels(train_labels, "train labels"), _as_labels(test_labels, "test labels")
    for y in (ytr, yte):
        if len(y) and (y.min() < 0 or y.max() >= len(sc)):
            raise PFedMoAPError(f"data.partition = 'dirichlet-superclass': labels go up to {y.max()} but the "
                                f"super-class map covers {len(sc)} classes")
    n_clients, beta, min_size = _check_n_clients(n_clients), _check_beta(beta), _check_min_size(min_size)
    rng = _rng(seed, "dirichlet-superclass")
    tr, counts = _dirichlet_core(sc[ytr], n_clients, beta, min_size, rng, "the data set")
    te = _split_test_like_train(sc[yte], np.unique(sc[ytr]), counts, n_clients, rng)
    return Partition([_sorted(t) for t in tr], [_sorted(t) for t in te])


def split_pathological(train_labels, test_labels, n_clients: int, classes_per_client: int, seed: int,
                       shots: int = 0, n_classes: int | None = None) -> Partition:
    """Seeded class shuffle, then client i owns classes perm[i*k:(i+1)*k] (k = classes_per_client,
    0 = n_classes // n_clients). Train: `shots` images per owned class (all if 0). Test: all test
    images of the owned classes."""
    n_clients, shots = _check_n_clients(n_clients), _check_shots(shots)
    ytr, yte = _as_labels(train_labels, "train labels"), _as_labels(test_labels, "test labels")
    if n_classes is None:
        n_classes = int(max(ytr.max(initial=-1), yte.max(initial=-1))) + 1
    k = classes_per_client
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise PFedMoAPError(f"data.classes_per_client = {k!r}: expected an integer >= 0 "
                            f"(0 = n_classes // n_clients)")
    k = int(k) or n_classes // n_clients
    if k < 1 or n_clients * k > n_classes:
        raise PFedMoAPError(f"data.classes_per_client = {classes_per_client}: {n_clients} clients x {max(k, 1)} "
                            f"classes exceeds the data set's {n_classes} classes; expected "
                            f"n_clients * classes_per_client <= {n_classes}")
    rng = _rng(seed, "pathological")
    perm = rng.permutation(n_classes)
    tr, te = [], []
    for i in range(n_clients):
        owned = perm[i * k:(i + 1) * k]
        tr.append(_sorted(np.flatnonzero(np.isin(ytr, owned))))
        te.append(_sorted(np.flatnonzero(np.isin(yte, owned))))
    part = Partition(tr, te)
    if shots:
        part = apply_shots(part, ytr, shots, seed)
    for i, t in enumerate(part.train):
        if len(t) == 0:
            raise PFedMoAPError(f"data.partition = 'pathological': client {i} owns classes "
                                f"{sorted(perm[i * k:(i + 1) * k].tolist())} with no training images")
    return part


def split_domain(train_labels, train_domains, test_labels, test_domains, n_clients: int, seed: int,
                 clients_per_domain: int = 1, beta: float = 0.5, min_size: int = 10,
                 domain_ids: Sequence[int] | None = None) -> Partition:
    """One client per domain (clients_per_domain = 1; n_clients must equal the number of domains),
    or Dirichlet(beta) over clients_per_domain clients inside each domain (n_clients = domains x
    clients_per_domain). Clients are domain-major: client d*clients_per_domain + j. A client's test
    set is the test images of its domain, split per class with its train shares.

    domain_ids: the domain ids to use, in client order (None = every id present in train)."""
    n_clients = _check_n_clients(n_clients)
    ytr, yte = _as_labels(train_labels, "train labels"), _as_labels(test_labels, "test labels")
    dtr, dte = _as_labels(train_domains, "train domains"), _as_labels(test_domains, "test domains")
    if len(dtr) != len(ytr) or len(dte) != len(yte):
        raise PFedMoAPError("data.partition = 'domain': domains and labels differ in length")
    cpd = clients_per_domain
    if not isinstance(cpd, (int, np.integer)) or isinstance(cpd, bool) or cpd < 1:
        raise PFedMoAPError(f"data.clients_per_domain = {cpd!r}: expected an integer >= 1")
    cpd = int(cpd)
    doms = np.unique(dtr) if domain_ids is None else np.asarray(list(domain_ids), np.int64)
    if n_clients != len(doms) * cpd:
        raise PFedMoAPError(f"data.n_clients = {n_clients}: partition 'domain' needs n_clients = number of "
                            f"domains ({len(doms)}) x clients_per_domain ({cpd}) = {len(doms) * cpd}")
    tr, te = [], []
    for d in doms:
        ptr, pte = np.flatnonzero(dtr == d), np.flatnonzero(dte == d)
        if len(ptr) == 0:
            raise PFedMoAPError(f"data.partition = 'domain': domain {int(d)} has no training images")
        if cpd == 1:
            tr.append(_sorted(ptr))
            te.append(_sorted(pte))
            continue
        rng = _rng(seed, "domain", str(int(d)))
        beta_ok, ms = _check_beta(beta), _check_min_size(min_size)
        sub, counts = _dirichlet_core(ytr[ptr], cpd, beta_ok, ms, rng, f"domain {int(d)}")
        sub_te = _split_test_like_train(yte[pte], np.unique(ytr[ptr]), counts, cpd, rng)
        tr += [_sorted(ptr[s]) for s in sub]
        te += [_sorted(pte[s]) for s in sub_te]
    return Partition(tr, te)


def apply_shots(part: Partition, train_labels, shots: int, seed: int) -> Partition:
    """Few-shot sampling: each client keeps at most `shots` training images per class (seeded,
    drawn per client so results do not depend on the other clients). 0 = keep all."""
    shots = _check_shots(shots)
    if shots == 0:
        return part
    y = _as_labels(train_labels, "train labels")
    out = []
    for i, idx in enumerate(part.train):
        rng = _rng(seed, "shots", str(i))
        keep = []
        for c in np.unique(y[idx]):
            pos = idx[y[idx] == c]
            keep.append(pos if len(pos) <= shots else rng.choice(pos, shots, replace=False))
        out.append(_sorted(np.concatenate(keep)) if keep else np.zeros(0, np.int64))
    return Partition(out, [t.copy() for t in part.test])


# --------------------------------------------------------------------------- entry points

def _cfg(cfg, key, default):
    return getattr(cfg, key, default)


def _domain_ids(dataset, names) -> list[int] | None:
    """cfg.domains (names) -> ids into dataset.domain_names; [] = every domain with training images."""
    if not names:
        present = set(np.unique(dataset.train.domains).tolist())
        return [i for i in range(len(dataset.domain_names)) if i in present] or sorted(present)
    ids = []
    for n in names:
        if n not in dataset.domain_names:
            raise PFedMoAPError(f"data.domains: {n!r} is not a domain of {dataset.name}; expected a subset "
                                f"of {list(dataset.domain_names)}")
        ids.append(dataset.domain_names.index(n))
    return ids


@register("iid")
def _iid(dataset, cfg, seed, n):
    return split_iid(dataset.train.labels, dataset.test.labels, n, seed)


@register("dirichlet")
def _dirichlet(dataset, cfg, seed, n):
    return split_dirichlet(dataset.train.labels, dataset.test.labels, n, _cfg(cfg, "beta", 0.5), seed,
                           _cfg(cfg, "min_size", 10))


@register("dirichlet-superclass")
def _dirichlet_superclass(dataset, cfg, seed, n):
    if dataset.superclass is None:
        raise PFedMoAPError(f"data.partition = 'dirichlet-superclass': data set {dataset.name!r} has no "
                            f"super-classes; expected cifar100 (or another data set with a super-class map)")
    return split_dirichlet_superclass(dataset.train.labels, dataset.test.labels, dataset.superclass, n,
                                      _cfg(cfg, "beta", 0.5), seed, _cfg(cfg, "min_size", 10))


@register("pathological")
def _pathological(dataset, cfg, seed, n):
    # shots are applied inside: test = all test images of the owned classes
    return split_pathological(dataset.train.labels, dataset.test.labels, n, _cfg(cfg, "classes_per_client", 0),
                              seed, _check_shots(_cfg(cfg, "shots", 0)), n_classes=dataset.n_classes)


@register("domain")
def _domain(dataset, cfg, seed, n):
    ids = _domain_ids(dataset, _cfg(cfg, "domains", []))
    return split_domain(dataset.train.labels, dataset.train.domains, dataset.test.labels, dataset.test.domains,
                        n, seed, _cfg(cfg, "clients_per_domain", 1), _cfg(cfg, "beta", 0.5),
                        _cfg(cfg, "min_size", 10), domain_ids=ids)


def make_partition(dataset, cfg, seed: int) -> Partition:
    """The partition named by cfg.partition of `dataset` (a FederatedDataset) over cfg.n_clients.

    cfg: config.DataConfig (partition, n_clients, beta, min_size, shots, classes_per_client,
    domains, clients_per_domain)."""
    method = _cfg(cfg, "partition", "dirichlet")
    n = _check_n_clients(_cfg(cfg, "n_clients", 10))
    shots = _check_shots(_cfg(cfg, "shots", 0))
    if method not in PARTITIONS:
        raise PFedMoAPError(f"data.partition = {method!r}: unknown; expected one of {', '.join(PARTITIONS)}")
    part = PARTITIONS[method](dataset, cfg, seed, n)
    return part if method == "pathological" else apply_shots(part, dataset.train.labels, shots, seed)


def partition_summary(partition: Partition, dataset) -> str:
    """Per client: train/test sizes, number of classes and the largest class counts; compact."""
    ytr, yte = dataset.train.labels, dataset.test.labels
    multi = len(dataset.domain_names) > 1
    tr_sz, te_sz = partition.train_sizes(), partition.test_sizes()
    lo = lambda a: int(a.min()) if len(a) else 0  # noqa: E731
    hi = lambda a: int(a.max()) if len(a) else 0  # noqa: E731
    lines = [f"{dataset.name}: {partition.n_clients} clients, {dataset.n_classes} classes; "
             f"train {tr_sz.sum()}/{len(ytr)} images (min {lo(tr_sz)}, max {hi(tr_sz)}), "
             f"test {te_sz.sum()}/{len(yte)} (min {lo(te_sz)}, max {hi(te_sz)})"]
    w = len(str(max(partition.n_clients - 1, 0)))
    for i, (a, b) in enumerate(zip(partition.train, partition.test)):
        cls, cnt = np.unique(ytr[a], return_counts=True)
        order = np.argsort(-cnt, kind="stable")[:6]
        top = " ".join(f"{int(cls[o])}:{int(cnt[o])}" for o in order)
        more = " ..." if len(cls) > 6 else ""
        dom = ""
        if multi and len(a):
            ds = np.unique(dataset.train.domains[a])
            dom = " domain " + ",".join(dataset.domain_names[d] if d < len(dataset.domain_names) else str(d)
                                        for d in ds.tolist())
        lines.append(f"  client {i:>{w}}: train {len(a):>6} test {len(b):>6}  "
                     f"classes {len(cls):>3} [{top}{more}]{dom}")
    return "\n".join(lines)
