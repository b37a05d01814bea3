"""The round loop, written once: server side on rank 0, client-group side on every rank hosting clients.

Independent of transport: it talks to `comm` (MPI or a local stand-in) only through whole-buffer
collectives, one per exchange. With one process rank 0 hosts every client and the same code runs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import algorithms, comm as comm_mod, dp, rng, router, store
from .clip.backbone import Backbone
from .clip.prompt import PromptEncoder, context_length
from .config import Config
from .data import features as feature_cache
from .data.datasets import load_dataset
from .data.partition import make_partition
from .errors import PFedMoAPError

PHASES = ("comm", "experts", "train", "eval", "write")
EXIT_STOPPED = 75          # checkpointed on a signal: the job script requeues and resumes
_stop = {"requested": False}


def request_stop(*_args) -> None:
    """Signal handler: finish the current round, checkpoint, exit with EXIT_STOPPED."""
    _stop["requested"] = True


def sample_participants(seed: int, round_: int, n_clients: int, frac: float) -> np.ndarray:
    """The round's participants (sorted client ids), a pure function of the seed and the round."""
    m = max(1, int(round(frac * n_clients)))
    if m >= n_clients:
        return np.arange(n_clients)
    return np.sort(rng.numpy_rng(seed, "participants", round_).choice(n_clients, m, replace=False))


@dataclass
class Outcome:
    run_dir: Path
    status: str                                  # complete | stopped
    mean_accuracy: list[float] = field(default_factory=list)
    domain_accuracy: dict[str, float] = field(default_factory=dict)   # last round, pooled over clients


class Federation:
    def __init__(self, cfg: Config, comm, log=print):
        self.cfg, self.comm, self.log = cfg, comm, log
        self.root = comm.rank == 0
        torch.set_num_threads(cfg.run.threads or (1 if comm.size > 1 else torch.get_num_threads()))
        error = None
        try:
            self._setup()
        except PFedMoAPError as e:   # e.g. a data root or weight file missing on one node only
            error = e
        comm_mod.agree(comm, error)
        self._setup_clients()

    def _setup(self) -> None:
        """Everything that reads the user's input: data, partition, placement, backbone, method."""
        cfg, comm = self.cfg, self.comm
        d = cfg.data
        self.dataset = load_dataset(d)
        self.partition = make_partition(self.dataset, d, cfg.seed)
        self.N = len(self.partition.train)
        self.n_train = np.array([len(t) for t in self.partition.train], np.int64)
        self.owner = comm_mod.place_clients(self.n_train, comm.size)
        self.mine = np.flatnonzero(self.owner == comm.rank)
        self.counts_hosted = np.bincount(self.owner, minlength=comm.size)
        self.algo_cls = algorithms.get(cfg.algorithm)
        self.rounds = cfg.rounds if self.algo_cls.trains else 1
        self.n_experts = cfg.moe.n_experts - 1 if self.algo_cls.uses_experts else 0

        m = cfg.model
        self.backbone = Backbone(m.name, m.pretrained, m.device, m.precision, rng.key(cfg.seed, "backbone-init"))
        n_ctx = context_length(cfg.prompt.n_ctx, cfg.prompt.init, self.backbone)
        self.encoder = PromptEncoder(self.backbone, self.dataset.classnames, n_ctx,
                                     truncate=cfg.run.truncate_eos, shared_prefix=cfg.run.shared_prefix)
        self.algo = self.algo_cls(cfg, self.encoder, self.backbone)
        probe = self.algo.init_client(0)
        self.ctx_shape = tuple(probe.ctx.shape)
        self.P = int(np.prod(self.ctx_shape))
        self.S = len(self.algo.state_vector(probe))

    def _setup_clients(self) -> None:
        d = self.cfg.data
        feats = self._image_features()
        dev = self.backbone.device
        self.data = {}
        for c in self.mine:
            tr, te = self.partition.train[c], self.partition.test[c]
            self.data[c] = algorithms.ClientData(
                torch.from_numpy(feats["train"][tr]).to(dev), torch.from_numpy(self.dataset.train.labels[tr]).to(dev),
                torch.from_numpy(feats["test"][te]).to(dev), torch.from_numpy(self.dataset.test.labels[te]).to(dev),
                torch.from_numpy(np.stack([feats[f"view{v}"][tr] for v in range(d.augment_views)])).to(dev)
                if d.augment_views else None)
        self.states = {c: self.algo.init_client(int(c)) for c in self.mine}
        self._own_text: dict[int, torch.Tensor] = {}   # evaluation text features of unchanged prompts
        self.global_prompt: np.ndarray | None = None
        # server state (rank 0)
        self.pool = np.zeros((self.N, self.P), np.float32) if self.root else None
        self.in_pool = np.zeros(self.N, bool)
        self.results: store.Results | None = None

    # ------------------------------------------------------------------ set-up
    def _image_features(self) -> dict[str, np.ndarray]:
        """Frozen image features, computed once per image (and augmented view); cached in HDF5 when
        data.cache_dir is set, else computed by each rank for its own clients only."""
        jobs = [("train", None), ("test", None)] + [("train", v) for v in range(self.cfg.data.augment_views)]
        out = {}
        for split, view in jobs:
            images = getattr(self.dataset, split)
            if self.cfg.data.cache_dir:
                key = feature_cache.cache_key(self.backbone, self.dataset, split, view)
                path = feature_cache.cache_path(self.cfg.data.cache_dir, key)
                if self.root and feature_cache.read(path, len(images), self.backbone.embed_dim) is None:
                    feature_cache.write(path, feature_cache.compute(self.backbone, images, view=view))
                self.comm.barrier()
                x = feature_cache.read(path, len(images), self.backbone.embed_dim)
                if x is None:   # only this rank: a traceback and an abort, not a hang
                    raise RuntimeError(f"feature cache {path} is not readable from rank {self.comm.rank} "
                                       f"(data.cache_dir on a file system the ranks do not share?)")
            else:
                idx = np.concatenate([getattr(self.partition, split)[c] for c in self.mine] + [np.zeros(0, np.int64)])
                x = feature_cache.compute(self.backbone, images, idx, view=view)
            out[split if view is None else f"view{view}"] = x
        return out

    def _partition_arrays(self) -> dict:
        C = self.dataset.n_classes
        tr_owner = np.full(len(self.dataset.train), -1, np.int32)
        te_owner = np.full(len(self.dataset.test), -1, np.int32)
        counts = np.zeros((self.N, C), np.int32)
        test_counts = np.zeros((self.N, C), np.int32)
        for c in range(self.N):
            tr, te = self.partition.train[c], self.partition.test[c]
            tr_owner[tr], te_owner[te] = c, c
            counts[c] = np.bincount(self.dataset.train.labels[tr], minlength=C)
            test_counts[c] = np.bincount(self.dataset.test.labels[te], minlength=C)
        return {"train_client": tr_owner, "test_client": te_owner, "class_counts": counts,
                "test_class_counts": test_counts, "n_train": self.n_train.astype(np.int32),
                "test_domain_counts": np.stack([np.bincount(self.dataset.test.domains[self.partition.test[c]],
                                                            minlength=len(self.dataset.domain_names))
                                                for c in range(self.N)]).astype(np.int32),
                "classnames": self.dataset.classnames, "domain_names": self.dataset.domain_names}

    # ------------------------------------------------------------------ run
    def run(self, run_dir: str | Path, if_exists: str = "refuse") -> Outcome:
        run_dir = Path(run_dir)
        start, error = 0, None
        ckpt = None
        if self.root:
            try:
                start, ckpt = self._open_run_dir(run_dir, if_exists)
            except PFedMoAPError as e:
                error = e
        comm_mod.agree(self.comm, error)
        start = int(self.comm.bcast(np.array([start], np.int64))[0])
        if start > 0:
            self._restore(ckpt)
        outcome = Outcome(run_dir, "complete")
        for r in range(start, self.rounds):
            self._round(r)
            last = r == self.rounds - 1
            stop = self.comm.allreduce_max(int(_stop["requested"])) and not last
            every = self.cfg.run.checkpoint_every
            # results first: a crash between the two leaves a checkpoint older than the log, which
            # resuming cuts back; never a log with rounds missing.
            status = "complete" if last else ("stopped" if stop else None)
            t = time.perf_counter()
            if self.root:
                self.results.write(status)
            if last or stop or (every and (r + 1) % every == 0):
                self._checkpoint(run_dir, r + 1)
            if self.root:      # rank 0's writing time belongs to the round just written
                dt = time.perf_counter() - t
                self.results.rows["phase_time"][-1][0, PHASES.index("write")] += dt
                self.results.rows["wall_time"][-1] += dt
                if status:     # the final file carries the final timings too
                    self.results.write(status)
            if stop:
                outcome.status = "stopped"
                break
        if self.root:
            acc = self.results.rows["accuracy"]
            outcome.mean_accuracy = [float(np.nanmean(a)) for a in acc]
            counts = self.results.partition["test_domain_counts"]
            hits = np.nansum(self.results.rows["domain_accuracy"][-1] * counts, axis=0)
            outcome.domain_accuracy = {name: float(hits[j] / counts[:, j].sum())
                                       for j, name in enumerate(self.dataset.domain_names) if counts[:, j].sum()}
        return outcome

    def _open_run_dir(self, run_dir: Path, if_exists: str):
        ckpt = None
        start = 0
        if store.has_run(run_dir):
            if if_exists == "refuse":
                raise PFedMoAPError(f"--out {run_dir}: already holds a run; pass --if-exists resume or "
                                    f"overwrite, or choose another directory")
            if if_exists == "overwrite":
                for name in (store.RESULTS, store.CHECKPOINT):
                    (run_dir / name).unlink(missing_ok=True)
            elif if_exists == "resume" and (run_dir / store.CHECKPOINT).exists():
                attrs, arrays = store.read_checkpoint(run_dir)
                if attrs["config_hash"] != self.cfg.hash():
                    raise PFedMoAPError(f"{run_dir / store.CHECKPOINT}: written by a different configuration "
                                        f"(config hash {attrs['config_hash']} != {self.cfg.hash()}); "
                                        f"refusing to resume")
                for key, shape in (("client_state", (self.N, self.S)), ("pool", (self.N, self.P))):
                    if arrays.get(key) is None or arrays[key].shape != shape:
                        raise PFedMoAPError(f"{run_dir / store.CHECKPOINT}: {key} has an unexpected shape")
                start, ckpt = int(attrs["round"]), arrays
        run_dir.mkdir(parents=True, exist_ok=True)
        if start > 0:
            self.results = store.Results.reopen(run_dir, start)
        else:
            attrs = {"config": self.cfg.to_toml(), "algorithm": self.cfg.algorithm,
                     "dataset": self.cfg.data.dataset, "partition": self.cfg.data.partition,
                     "seed": self.cfg.seed, "world_size": self.comm.size, "n_clients": self.N,
                     "n_classes": self.dataset.n_classes, "n_rounds": self.rounds,
                     "config_hash": self.cfg.hash()}
            self.results = store.Results(run_dir, attrs, self._partition_arrays(), list(PHASES))
        self.results.attrs["world_size"] = self.comm.size
        return start, ckpt

    # ------------------------------------------------------------------ one round
    def _round(self, r: int) -> None:
        t_round = time.perf_counter()
        phase = dict.fromkeys(PHASES, 0.0)
        N, P, E = self.N, self.P, self.n_experts
        participants = sample_participants(self.cfg.seed, r, N, self.cfg.train.frac) \
            if self.algo.trains else np.zeros(0, np.int64)
        is_part = np.zeros(N, bool)
        is_part[participants] = True
        bytes_up = np.zeros(N, np.int64)
        bytes_down = np.zeros(N, np.int64)

        # 1-3. down: the global prompt, then each client's experts (routed on the pool snapshot)
        t = time.perf_counter()
        if self.algo.shares_prompt and r > 0:
            self.global_prompt = self.comm.bcast(self.global_prompt if self.root else np.empty(P, np.float32))
            bytes_down[is_part] += 4 * P
        expert_ids = self._scatter_expert_ids(r) if E else np.zeros((len(self.mine), 0), np.int32)
        expert_rows = self._scatter_expert_rows(expert_ids) if E else np.zeros((0, P), np.float32)
        if E and self.root:
            bytes_down += 4 * E + 4 * P * (self._all_expert_ids >= 0).sum(1)
        phase["comm"] += time.perf_counter() - t

        # 4. clients: train the participants, upload their prompts
        gp = None if self.global_prompt is None else torch.from_numpy(self.global_prompt).reshape(self.ctx_shape)
        t = time.perf_counter()
        expert_feats = self._expert_features(expert_ids, expert_rows)
        phase["experts"] += time.perf_counter() - t
        t = time.perf_counter()
        uploads = []
        bar = self._progress_bar(r, int(is_part[self.mine].sum()) + len(self.mine))
        for i, c in enumerate(self.mine):
            if not is_part[c]:
                continue
            bar.update()
            state = self.states[c]
            self.algo.start_round(state, gp)
            self.algo.fit(state, self.data[c], r, int(c), gp, expert_feats[i])
            self._own_text.pop(c, None)           # its prompt changed
            if self.algo.shares_prompt:
                up = dp.privatize(state.ctx.reshape(-1).cpu().numpy(), self.cfg.dp.clip,
                                  self.cfg.dp.noise_multiplier, rng.numpy_rng(self.cfg.seed, "dp", r, int(c)))
                uploads.append(np.concatenate([up, [self.n_train[c]]]).astype(np.float32))
        phase["train"] += time.perf_counter() - t

        # 5. server: the uploads by one Gatherv, FedAvg, the pool
        t = time.perf_counter()
        if self.algo.shares_prompt:
            counts = [int(is_part[self.owner == k].sum()) * (P + 1) for k in range(self.comm.size)]
            rows = self.comm.gatherv(np.concatenate(uploads) if uploads else np.zeros(0, np.float32), counts)
            bytes_up[is_part] = 4 * (P + 1)
            if self.root:
                rows = rows.reshape(-1, P + 1)
                self.pool[participants] = rows[:, :P]
                self.in_pool[participants] = True
                self.global_prompt = self.algo.aggregate(rows[:, :P], rows[:, P])
            if self.algo.eval_with_global:
                self.global_prompt = self.comm.bcast(self.global_prompt if self.root else np.empty(P, np.float32))
                bytes_down += 4 * P
                gp = torch.from_numpy(self.global_prompt).reshape(self.ctx_shape)
        phase["comm"] += time.perf_counter() - t

        # 6. every hosted client is evaluated on its own test split
        t = time.perf_counter()
        K, n_dom = E + 1, len(self.dataset.domain_names)
        width = 3 + K + n_dom
        metrics = np.full((len(self.mine), width), np.nan, np.float32)
        global_text = None
        for i, c in enumerate(self.mine):
            bar.update()
            if self.algo.eval_with_global and gp is not None:     # the same prompt for every client
                global_text = self.algo.text_features(self.states[c], gp) if global_text is None else global_text
                own = global_text.unsqueeze(0)
            else:      # a client that did not train keeps its prompt, hence its text features
                if c not in self._own_text:
                    self._own_text[c] = self.algo.text_features(self.states[c], gp)
                own = self._own_text[c].unsqueeze(0)
            text = torch.cat([own, expert_feats[i]]) if expert_feats[i] is not None and len(expert_feats[i]) else own
            res = self.algo.evaluate(self.states[c], self.data[c], text)
            metrics[i, :3] = res.accuracy, res.macro_f1, res.loss
            if res.gate_weight is not None:
                metrics[i, 3:3 + len(res.gate_weight)] = res.gate_weight
            metrics[i, 3 + K:] = self._domain_accuracy(c, res.correct, n_dom)
        phase["eval"] += time.perf_counter() - t
        bar.close()

        t = time.perf_counter()
        metrics = self.comm.gatherv(metrics, [int(n) * width for n in self.counts_hosted])
        phase["comm"] += time.perf_counter() - t
        phase_row = np.array([phase[p] for p in PHASES], np.float32)
        phases = self.comm.gatherv(phase_row, [len(PHASES)] * self.comm.size)
        if self.root:
            t = time.perf_counter()
            metrics = metrics.reshape(N, width)
            self.results.append({
                "accuracy": metrics[:, 0], "macro_f1": metrics[:, 1], "loss": metrics[:, 2],
                "participated": is_part, "experts": self._all_expert_ids if E else np.zeros((N, 0), np.int32),
                "gate_weight": metrics[:, 3:3 + K] if E else np.ones((N, 1), np.float32),
                "domain_accuracy": metrics[:, 3 + K:],
                "bytes_up": bytes_up, "bytes_down": bytes_down,
                "phase_time": phases.reshape(self.comm.size, len(PHASES)),
                "wall_time": time.perf_counter() - t_round})
            self.log(f"round {r + 1}/{self.rounds}  mean accuracy {np.nanmean(metrics[:, 0]):.4f}  "
                     f"participants {len(participants)}/{N}  {time.perf_counter() - t_round:.1f}s")
            self.results.rows["phase_time"][-1][0, PHASES.index("write")] += time.perf_counter() - t

    def _progress_bar(self, r: int, steps: int):
        """Clients trained and evaluated so far, on a terminal, when rank 0 hosts the clients."""
        from tqdm import tqdm
        show = self.cfg.run.progress and self.root and self.comm.size == 1 and sys.stderr.isatty()
        return tqdm(total=steps, desc=f"round {r + 1}/{self.rounds}", unit="client-step", leave=False,
                    disable=not show)

    def _domain_accuracy(self, c: int, correct: np.ndarray, n_dom: int) -> np.ndarray:
        """Accuracy of client c on each domain of its test split (NaN where it has none)."""
        dom = self.dataset.test.domains[self.partition.test[c]]
        hits = np.bincount(dom, weights=correct, minlength=n_dom)
        counts = np.bincount(dom, minlength=n_dom)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, hits / counts, np.nan)

    def _scatter_expert_ids(self, r: int) -> np.ndarray:
        E = self.n_experts
        if self.root:
            clients = np.arange(self.N)
            # a client that never uploaded is compared by the global prompt (knn)
            queries = np.where(self.in_pool[:, None], self.pool,
                               self.global_prompt if self.global_prompt is not None else 0.0)
            self._all_expert_ids = router.route(self.cfg.moe.router, self.pool, self.in_pool, queries,
                                                clients, E, self.cfg.seed, r)
        recv = np.empty((len(self.mine), E), np.int32)
        return self.comm.scatterv(self._all_expert_ids if self.root else None,
                                  [int(n) * E for n in self.counts_hosted], recv)

    def _scatter_expert_rows(self, my_ids: np.ndarray) -> np.ndarray:
        P = self.P
        send, counts = None, None
        if self.root:
            ids = self._all_expert_ids
            send = self.pool[ids[ids >= 0]]          # row-major: client by client, expert by expert
            counts = [int((ids[self.owner == k] >= 0).sum()) * P for k in range(self.comm.size)]
        else:
            counts = [0] * self.comm.size
        recv = np.empty((int((my_ids >= 0).sum()), P), np.float32)
        return self.comm.scatterv(send, counts, recv)

    def _expert_features(self, ids: np.ndarray, rows: np.ndarray) -> list[torch.Tensor | None]:
        """Per hosted client, its experts' text features (E, C, D): no grad, once per expert per rank."""
        if not self.n_experts:
            return [None] * len(self.mine)
        cache: dict[int, torch.Tensor] = {}
        out, k = [], 0
        for i in range(len(self.mine)):
            feats = []
            for e in ids[i]:
                if e < 0:
                    continue
                if int(e) not in cache:
                    ctx = torch.from_numpy(rows[k]).reshape(self.ctx_shape)
                    cache[int(e)] = self.encoder.encode_frozen(ctx.unsqueeze(0))[0]
                feats.append(cache[int(e)])
                k += 1
            out.append(torch.stack(feats) if feats else None)
        return out

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, run_dir: Path, rounds_done: int) -> None:
        S = self.S
        local = np.stack([self.algo.state_vector(self.states[c]) for c in self.mine]) \
            if len(self.mine) else np.zeros((0, S), np.float32)
        states = self.comm.gatherv(local, [int(n) * S for n in self.counts_hosted])
        if self.root:
            arrays = {"client_state": states.reshape(self.N, S), "pool": self.pool, "in_pool": self.in_pool,
                      "global_prompt": self.global_prompt if self.global_prompt is not None else np.zeros(0, np.float32)}
            store.write_checkpoint(run_dir, rounds_done, self.cfg.to_toml(), self.cfg.hash(), arrays)

    def _restore(self, ckpt: dict | None) -> None:
        S, P = self.S, self.P
        recv = np.empty((len(self.mine), S), np.float32)
        self.comm.scatterv(ckpt["client_state"] if self.root else None,
                           [int(n) * S for n in self.counts_hosted], recv)
        for i, c in enumerate(self.mine):
            self.algo.load_state_vector(self.states[c], recv[i])
        self._own_text.clear()
        has_global = self.comm.bcast(np.array([len(ckpt["global_prompt"]) if self.root else 0], np.int64))[0]
        if has_global:
            self.global_prompt = self.comm.bcast(ckpt["global_prompt"] if self.root else np.empty(P, np.float32))
        if self.root:
            self.pool[...] = ckpt["pool"]
            self.in_pool[...] = ckpt["in_pool"]
