"""Everything a run is built from, before its first round: data set, partition, placement of clients
on ranks, frozen backbone and prompt encoder, the method, and each hosted client's image features.

Errors here are the user's (a missing data root or weight file, perhaps on one node only): the
ranks agree on them (comm.agree) so that every rank stops with one line, never a hang.
"""
from __future__ import annotations

import numpy as np
import torch

import dataclasses

from . import algorithms, comm as comm_mod, dp, protocols, rng
from .algorithms.base import ClientData, Setup
from .clip.backbone import Backbone
from .clip.prompt import PromptEncoder, context_length, init_context
from .config import Config
from .data import features as feature_cache
from .data.datasets import load_dataset
from .data.partition import make_partition
from .errors import PFedMoAPError


class Build:
    def __init__(self, cfg: Config, comm):
        self.cfg, self.comm = cfg, comm
        if cfg.run.threads:      # 0: leave torch's default (all cores, or OMP_NUM_THREADS)
            torch.set_num_threads(cfg.run.threads)
        error = None
        try:
            self._inputs()
        except PFedMoAPError as e:   # e.g. a data root or weight file missing on one node only
            error = e
        comm_mod.agree(comm, error)
        self._test_rows = None           # the run's test split features, when a protocol scores all of it
        self.data = self._client_data()
        self.evaluator = self._evaluator()

    def _inputs(self) -> None:
        cfg, comm = self.cfg, self.comm
        self.manifest = algorithms.manifest(cfg.algorithm)
        method_cls = self.manifest.load()
        self.dense = self.manifest.data.dense
        # the protocol decides what the run trains on (base2novel: the base classes; leave one
        # domain out: the other domains); the partition, the class names and the features follow it
        self.protocol = protocols.build(cfg, load_dataset(cfg.data), self._load_target)
        self.dataset = self.protocol.train
        held = cfg.eval.held_out         # data.domains may name it: the partition runs over the others
        part_cfg = dataclasses.replace(cfg.data, domains=[d for d in cfg.data.domains if d != held]) if held \
            else cfg.data
        self.partition = make_partition(self.dataset, part_cfg, cfg.seed)
        self.N = len(self.partition.train)
        self.n_train = np.array([len(t) for t in self.partition.train], np.int64)
        self.owner = comm_mod.place_clients(self.n_train, comm.size, cfg.train.client_block)
        self.mine = np.flatnonzero(self.owner == comm.rank)
        m = cfg.model
        self.backbone = Backbone(m.name, m.pretrained, m.device, m.precision, rng.key(cfg.seed, "backbone-init"))
        if self.dense:
            feature_cache.check_dense(self.backbone)
        n_ctx = context_length(cfg.prompt.n_ctx, cfg.prompt.init, self.backbone)
        self.encoder = PromptEncoder(self.backbone, self.dataset.classnames, n_ctx,
                                     truncate=cfg.run.truncate_eos, shared_prefix=cfg.run.shared_prefix,
                                     cuda_graph=cfg.run.cuda_graph)
        ctx_shape = tuple(init_context(self.backbone, cfg.prompt.n_ctx, cfg.prompt.init, torch.Generator()).shape)
        setup = Setup(cfg, self.N, self.encoder, self.backbone, ctx_shape)
        self.method = method_cls(setup)
        self.client = self.method.client()
        self._privacy()
        self.state_size = len(self.client.state_vector(self.client.init_state(0)))

    def _load_target(self, name: str):
        """A cross-dataset target: the data set `name` with the run's [data] keys, every domain."""
        return load_dataset(dataclasses.replace(self.cfg.data, dataset=name, domains=[]))

    def _scores_own_test(self) -> bool:
        """A protocol set is the run's own test split (base2novel's Base): its every row is needed."""
        return any(s.dataset is self.dataset for s in self.protocol.sets)

    def _evaluator(self) -> protocols.Evaluator | None:
        """The protocol's scoring on this rank: each set's test features (computed once, cached
        with data.cache_dir as the clients' are) and an encoder of each other class list."""
        p = self.protocol
        if not p.width:
            return None
        dev, m = self.backbone.device, self.cfg.run
        data, encoders = {}, {}
        for i, s in enumerate(p.sets):
            ds, n = s.dataset, len(s.dataset.test)
            if s.dataset is self.dataset and self._test_rows is not None:
                idx, x, dense = self._test_rows
            elif self.dense:
                idx, x, dense = self._dense_rows(ds, "test", np.arange(n))
            else:
                idx, x, dense = None, self._split_features(ds, "test", None, np.arange(n)), None
            if idx is not None and len(idx) != n:     # only the rows of this rank's clients: not a set
                raise RuntimeError("protocol set features incomplete")
            # a method training inside the image tower (DataNeeds.images) scores the set's images
            images = (feature_cache.ClientImages(self.backbone, ds, np.zeros(0, np.int64), np.arange(n),
                                                 self.cfg.seed, device=dev) if self.manifest.data.images else None)
            data[i] = (torch.from_numpy(np.ascontiguousarray(x)).to(dev), torch.from_numpy(ds.test.labels).to(dev),
                       None if dense is None else torch.from_numpy(dense).to(dev), images)
            if not s.same_classes:
                encoders[i] = PromptEncoder(self.backbone, ds.classnames, self.encoder.n_ctx,
                                            truncate=m.truncate_eos, shared_prefix=m.shared_prefix)
        return protocols.Evaluator(p, self.method, encoders, data)

    def _privacy(self) -> None:
        """The noise multiplier and sensitivity of the uploads (Setup.dp_noise, dp_sensitivity) and
        the ε planned by the end of each round (docs/privacy.md).

        Client-level accounting (dp.py: Poisson-subsampled Gaussian, RDP), each round at the rate
        the method's server samples it, less the uploads that drop out (train.drop_rate): arrived(r) / N,
        the participants asked of a fresh server object (a pure function of the seed and the round,
        as the drop-outs are), e.g. FedOTP's round 0 trains every client. The noise is
        solved from dp.epsilon when given. `dp_spent` records what the rounds actually spend."""
        d, setup = self.cfg.dp, self.method.setup
        self.dp_noise, self.dp_epsilon, self.dp_sensitivity, self.dp_accountant = 0.0, None, 0.0, None
        if d.clip <= 0:
            return
        server = self.method.server()
        # a method that uploads nothing (local, zeroshot) releases nothing: rate 0, ε 0
        self.dp_releases = bool(self.method.arrays().up)
        self.dp_rates = np.array([self.released(r, server.participants(r)) / self.N * self.dp_releases
                                  for r in range(self.manifest.rounds_for(self.cfg))])
        sigma = d.noise_multiplier
        if d.epsilon > 0 and self.dp_releases:
            try:
                sigma = dp.noise_for(d.epsilon, d.delta, self.dp_rates, orders=dp.ORDERS)
            except ValueError as e:
                raise PFedMoAPError(f"dp.epsilon = {d.epsilon}: no noise multiplier reaches it ({e})") from None
        if d.mechanism == "gradient":
            # every upload gets the noise of the largest sensitivity any client's local steps have,
            # so that the noise level says nothing about a client's number of steps
            per_unit = max(self.client.upload_sensitivity(int(n)) for n in np.unique(self.n_train))
            self.dp_sensitivity = d.clip * per_unit
        else:
            self.dp_sensitivity = d.clip
        self.dp_noise = float(sigma)
        setup.dp_noise, setup.dp_sensitivity = self.dp_noise, self.dp_sensitivity
        if sigma <= 0 and self.dp_releases:
            self.dp_epsilon = np.full(len(self.dp_rates), np.inf)
            return
        self.dp_accountant = dp.Accountant(sigma, d.delta, dp.ORDERS)
        self.dp_epsilon = self.dp_accountant.curve(self.dp_rates)

    def released(self, round_: int, participants: np.ndarray) -> int:
        """How many of the round's participants release an upload: those whose upload arrives
        (train.drop_rate; a dropped upload is never seen, so it spends no privacy)."""
        t = self.cfg.train
        return len(participants) - int(rng.dropped(self.cfg.seed, round_, participants, t.drop_rate, self.N).sum())

    def dp_spent(self, round_: int, n_participants: int) -> float:
        """ε spent by the end of `round_`, with `n_participants` clients' uploads released in it (the
        rounds before it as they ran, or as planned before a resume: participants(r) is a pure
        function of the seed and r); NaN without DP."""
        if self.dp_epsilon is None:
            return float("nan")
        self.dp_rates[round_] = n_participants / self.N * self.dp_releases
        if self.dp_accountant is None:          # clipping without noise
            return float("inf")
        return self.dp_accountant.epsilon(self.dp_rates[:round_ + 1])

    def _client_data(self) -> dict[int, ClientData]:
        if self.dense:
            return self._dense_client_data()
        if self.manifest.data.images:
            return self._image_client_data()
        d = self.cfg.data
        feats = self._image_features()
        dev = self.backbone.device
        self.fresh = self._fresh_views() if d.augment_mode == "fresh" else None
        views = d.augment_views if d.augment_mode == "views" else 0
        out = {}
        for c in self.mine:
            tr, te = self.partition.train[c], self.partition.test[c]
            out[int(c)] = ClientData(
                torch.from_numpy(feats["train"][tr]).to(dev), torch.from_numpy(self.dataset.train.labels[tr]).to(dev),
                torch.from_numpy(feats["test"][te]).to(dev), torch.from_numpy(self.dataset.test.labels[te]).to(dev),
                torch.from_numpy(np.stack([feats[f"view{v}"][tr] for v in range(views)])).to(dev)
                if views else None,
                fresh_views=self.fresh.for_client(int(c)) if self.fresh is not None else None)
        return out

    def _image_client_data(self) -> dict[int, ClientData]:
        """DataNeeds.images (a method training inside the image tower): each hosted client's images
        (feature_cache.ClientImages; training views made per epoch as data.augment says, no
        augmented features computed) beside its clean frozen features (this rank's images only)."""
        d, dev = self.cfg.data, self.backbone.device
        feats = {}
        for split in ("train", "test"):
            idx = np.concatenate([getattr(self.partition, split)[c] for c in self.mine] + [np.zeros(0, np.int64)])
            feats[split] = feature_cache.compute(self.backbone, getattr(self.dataset, split), idx)
        out = {}
        for c in self.mine:
            tr, te = self.partition.train[c], self.partition.test[c]
            out[int(c)] = ClientData(
                torch.from_numpy(feats["train"][tr]).to(dev), torch.from_numpy(self.dataset.train.labels[tr]).to(dev),
                torch.from_numpy(feats["test"][te]).to(dev), torch.from_numpy(self.dataset.test.labels[te]).to(dev),
                images=feature_cache.ClientImages(self.backbone, self.dataset, tr, te, self.cfg.seed,
                                                  d.augment_mode, d.augment_views, dev))
        return out

    def _fresh_views(self) -> feature_cache.FreshViews:
        """data.augment = "fresh": each rank's store of its own clients' views per (round, local epoch).

        With data.cache_dir set, the views of every (hosted client, round) the method's server will
        pick are precomputed here, before the first round, one HDF5 file per client and round (the
        server part's `participants(round)`, asked of a fresh server object on every rank: a pure
        function of the seed and round for every method here). A client asked to train in a round not
        foreseen, or a run without data.cache_dir, gets its round's views encoded when it first asks
        (in fit, before its first step). In memory: one (client, round) block (E, n_c, D) at a time."""
        c = self.cfg
        images = {int(k): np.asarray(self.partition.train[k], np.int64) for k in self.mine}
        store = feature_cache.FreshViews(self.backbone, self.dataset, images, c.seed, c.train.local_epochs,
                                         c.data.cache_dir, self.backbone.device)
        if c.data.cache_dir and len(self.mine):
            server = self.method.server()
            for r in range(self.manifest.rounds_for(c)):
                for k in np.intersect1d(server.participants(r), self.mine):
                    if len(images[int(k)]):
                        store.precompute(int(k), r)
        return store

    def _image_features(self) -> dict[str, np.ndarray]:
        """Frozen image features, computed once per image (and augmented view); cached in HDF5 when
        data.cache_dir is set, else computed by each rank for its own clients only."""
        jobs = [("train", None), ("test", None)] + [("train", v) for v in range(self.cfg.data.augment_views)]
        out = {}
        for split, view in jobs:
            idx = np.concatenate([getattr(self.partition, split)[c] for c in self.mine] + [np.zeros(0, np.int64)])
            if split == "test" and self._scores_own_test():
                idx = np.arange(len(self.dataset.test))
            out[split if view is None else f"view{view}"] = self._split_features(self.dataset, split, view, idx)
        if self._scores_own_test():
            self._test_rows = (None, out["test"], None)
        return out

    def _split_features(self, dataset, split: str, view: int | None, idx: np.ndarray) -> np.ndarray:
        """(n, D) features of a split of `dataset`: every row from the HDF5 cache (data.cache_dir;
        rank 0 computes and writes it once), else the rows `idx` computed here (others zero)."""
        images = getattr(dataset, split)
        if not self.cfg.data.cache_dir:
            return feature_cache.compute(self.backbone, images, idx, view=view)
        key = feature_cache.cache_key(self.backbone, dataset, split, view)
        path = feature_cache.cache_path(self.cfg.data.cache_dir, key)
        if self.comm.rank == 0 and feature_cache.read(path, len(images), self.backbone.embed_dim) is None:
            feature_cache.write(path, feature_cache.compute(self.backbone, images, view=view))
        self.comm.barrier()
        x = feature_cache.read(path, len(images), self.backbone.embed_dim)
        if x is None:   # only this rank: a traceback and an abort, not a hang
            raise RuntimeError(f"feature cache {path} is not readable from rank {self.comm.rank} "
                               f"(data.cache_dir on a file system the ranks do not share?)")
        return x

    def _dense_client_data(self) -> dict[int, ClientData]:
        """Each hosted client's image features with its dense (patch) features: this rank reads or
        computes only the rows of its own clients (peak memory: those rows, about twice)."""
        dev = self.backbone.device
        rows = {split: self._dense_features(split) for split in ("train", "test")}
        if self._scores_own_test():
            self._test_rows = rows["test"]

        def take(split, ids):
            idx, x, dense = rows[split]
            pos = np.searchsorted(idx, ids)
            return torch.from_numpy(x[pos]).to(dev), torch.from_numpy(dense[pos]).to(dev)

        out = {}
        for c in self.mine:
            tr, te = self.partition.train[c], self.partition.test[c]
            (xtr, dtr), (xte, dte) = take("train", tr), take("test", te)
            out[int(c)] = ClientData(
                xtr, torch.from_numpy(self.dataset.train.labels[tr]).to(dev),
                xte, torch.from_numpy(self.dataset.test.labels[te]).to(dev),
                train_dense=dtr, test_dense=dte)
        return out

    def _dense_features(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the split's image ids this rank's clients hold, sorted; their (k, D) features; their
        (k, M, D) dense features). Cached in HDF5 as `_image_features` (rank 0 writes the file)."""
        idx = np.unique(np.concatenate([getattr(self.partition, split)[c] for c in self.mine]
                                       + [np.zeros(0, np.int64)]).astype(np.int64))
        if split == "test" and self._scores_own_test():
            idx = np.arange(len(self.dataset.test))
        return self._dense_rows(self.dataset, split, idx)

    def _dense_rows(self, dataset, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx, their (k, D) features, their (k, M, D) dense features) of a split of `dataset`."""
        images = getattr(dataset, split)
        if not self.cfg.data.cache_dir:
            return (idx, *feature_cache.compute_dense(self.backbone, images, idx))
        key = feature_cache.cache_key(self.backbone, dataset, split, kind="dense")
        path = feature_cache.cache_path(self.cfg.data.cache_dir, key)
        shape = feature_cache.dense_shape(self.backbone)
        if self.comm.rank == 0 and feature_cache.read_dense(path, len(images), shape, idx[:0]) is None:
            feature_cache.write_dense(path, self.backbone, images)
        self.comm.barrier()
        got = feature_cache.read_dense(path, len(images), shape, idx)
        if got is None:     # only this rank: a traceback and an abort, not a hang
            raise RuntimeError(f"feature cache {path} is not readable from rank {self.comm.rank} "
                               f"(data.cache_dir on a file system the ranks do not share?)")
        return (idx, *got)

    def partition_arrays(self) -> dict:
        """The split as results.h5 records it (/partition)."""
        C, N, ds = self.dataset.n_classes, self.N, self.dataset
        tr_owner = np.full(len(ds.train), -1, np.int32)
        te_owner = np.full(len(ds.test), -1, np.int32)
        counts = np.zeros((N, C), np.int32)
        test_counts = np.zeros((N, C), np.int32)
        for c in range(N):
            tr, te = self.partition.train[c], self.partition.test[c]
            tr_owner[tr], te_owner[te] = c, c
            counts[c] = np.bincount(ds.train.labels[tr], minlength=C)
            test_counts[c] = np.bincount(ds.test.labels[te], minlength=C)
        return {"train_client": tr_owner, "test_client": te_owner, "class_counts": counts,
                "test_class_counts": test_counts, "n_train": self.n_train.astype(np.int32),
                "test_domain_counts": np.stack([np.bincount(ds.test.domains[self.partition.test[c]],
                                                            minlength=len(ds.domain_names))
                                                for c in range(N)]).astype(np.int32),
                "classnames": ds.classnames, "domain_names": ds.domain_names}

    def domain_accuracy(self, c: int, correct: np.ndarray) -> np.ndarray:
        """Accuracy of client c on each domain of its test split (NaN where it has none)."""
        n_dom = len(self.dataset.domain_names)
        dom = self.dataset.test.domains[self.partition.test[c]]
        hits = np.bincount(dom, weights=correct, minlength=n_dom)
        counts = np.bincount(dom, minlength=n_dom)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, hits / counts, np.nan)

