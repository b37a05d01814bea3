"""The round loop, written once and for every method: server side on rank 0, clients on every rank
that hosts them. With one process rank 0 hosts every client and the same code runs.

It knows no method: each round it asks the method's server part for the participants and the
downloads, moves the declared arrays (exchange.Transport), hands the client part its hosted clients
a block at a time to train and evaluate (ClientPart.blocks, fit_block, evaluate_block), counts
bytes, times phases and writes results and checkpoints (store).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import comm as comm_mod, dp, store
from .build import Build
from .config import Config, from_toml, recorded_run_hash, run_hash
from .errors import PFedMoAPError
from .exchange import Broadcast, PerClient, Transport

log = logging.getLogger(__name__)

PHASES = ("comm", "prepare", "train", "eval", "write", "server")   # server: rank 0's method work
CHECKPOINT_BLOCK_BYTES = 64 << 20   # client states per gather/scatter step of a checkpoint, all ranks together
EXIT_STOPPED = 75          # checkpointed on a signal: the job script requeues and resumes
_stop = {"requested": False}


def request_stop(*_args) -> None:
    """Signal handler: finish the current round, checkpoint, exit with EXIT_STOPPED."""
    _stop["requested"] = True


@dataclass
class Outcome:
    run_dir: Path
    status: str                                  # complete | stopped
    mean_accuracy: list[float] = field(default_factory=list)
    domain_accuracy: dict[str, float] = field(default_factory=dict)   # last round, all clients' test images together


def _toml_run_hash(text: str) -> str:
    """The run hash of a config given as TOML text (a run directory's config.toml, results.h5's
    `config`): what resuming compares with the checkpoint's."""
    return run_hash(from_toml(text))


def evaluated_clients(cfg: Config, round_: int, rounds: int, participants: np.ndarray) -> np.ndarray:
    """(N,) bool: whom round `round_` evaluates (run.eval_every, run.eval_clients). The last round
    evaluates every client; so does every eval_every-th round with eval_clients = "all", while with
    "participants" those rounds evaluate the round's participants; other rounds evaluate nobody."""
    n = len(participants)
    if round_ == rounds - 1:
        return np.ones(n, bool)
    if (round_ + 1) % cfg.run.eval_every:
        return np.zeros(n, bool)
    return np.ones(n, bool) if cfg.run.eval_clients == "all" else participants.astype(bool).copy()


def _only(payload, mask: np.ndarray):
    """A download payload restricted to the clients in `mask`."""
    if isinstance(payload, Broadcast):
        return Broadcast(payload.row, np.asarray(payload.to, bool) & mask)
    counts = np.asarray(payload.counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return payload
    rows = np.asarray(payload.rows)
    rows = rows.reshape(total, -1) if rows.shape[:1] != (total,) else rows
    return PerClient(rows[np.repeat(mask, counts)], np.where(mask, counts, 0))


def _check_finite(round_: int, cid: int, values: dict, what: str) -> None:
    """A NaN or infinity stops the run (exit 2, one line) before anything of this round is written:
    the last checkpoint stays the last good state and results.h5 is never marked complete."""
    for name, v in values.items():
        a = np.asarray(v)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise PFedMoAPError(f"round {round_ + 1}, client {cid}: {what} {name!r} is not finite "
                                f"(diverged? lower train.lr, check dp.noise_multiplier and the method's options); "
                                f"the run stops, its last checkpoint is the last good state")


class Federation:
    def __init__(self, cfg: Config, comm):
        self.cfg, self.comm = cfg, comm
        self.root = comm.rank == 0
        b = self.build = Build(cfg, comm)
        self.dataset, self.partition, self.N = b.dataset, b.partition, b.N
        self.method, self.client = b.method, b.client
        self.arrays = self.method.arrays()
        self.logs = {lg.name: lg for lg in self.method.logs()}
        self.rounds = b.manifest.rounds_for(cfg)
        self.transport = Transport(comm, b.owner)
        self.mine = self.transport.mine
        self.server = self.method.server() if self.root else None
        self.states = {int(c): self.client.init_state(int(c)) for c in self.mine}
        self.results: store.Results | None = None
        self.run_hash = run_hash(cfg)
        self._owned: list[np.ndarray] | None = None          # rank 0: each rank's client ids
        self.checkpoints: list[tuple[int, float, int]] = []  # rank 0: (round, seconds, bytes) per checkpoint
        self._line = ""                                     # rank 0: the console line of the round not yet committed

    # ------------------------------------------------------------------ run
    def run(self, run_dir: str | Path, if_exists: str = "refuse") -> Outcome:
        run_dir = Path(run_dir)
        start, ckpt, error, self.lock = 0, None, None, None
        if self.root:
            try:
                start, ckpt, self.lock = store.open_run(run_dir, if_exists, self.run_hash,
                                                        self._checkpoint_shapes(), recorded_run_hash,
                                                        _toml_run_hash)
                self._open_results(run_dir, start)
            except PFedMoAPError as e:
                error = e
                if self.lock is not None:
                    self.lock.release()
        comm_mod.agree(self.comm, error)
        try:
            return self._rounds(run_dir, start, ckpt)
        finally:
            try:
                if self.results is not None:
                    self.results.close()      # a stopped run's file is cut to its rounds
            finally:
                if self.lock is not None:
                    self.lock.release()

    def _rounds(self, run_dir: Path, start: int, ckpt) -> Outcome:
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
                self.results.write(status)      # the commit: a committed row never changes
                log.info(self._line)            # a round on the console is a round in results.h5
            if last or stop or (every and (r + 1) % every == 0):
                self._checkpoint(run_dir, r + 1)
            if self.root:      # counted in the next round's write phase (after the last: final_write_time)
                self.results.add_time(time.perf_counter() - t)
            if stop:
                outcome.status = "stopped"
                break
        if self.root:
            outcome.mean_accuracy = list(self.results.mean_accuracy)
            counts = self.results.partition["test_domain_counts"]
            last = self.results.last_value("domain_accuracy")
            if last is not None:
                hits = np.nansum(last * counts, axis=0)
                outcome.domain_accuracy = {name: float(hits[j] / counts[:, j].sum())
                                           for j, name in enumerate(self.dataset.domain_names) if counts[:, j].sum()}
        return outcome

    def _open_results(self, run_dir: Path, start: int) -> None:
        fields = {lg.name: store.Field(np.dtype(lg.dtype).type, "", lg.description, tuple(lg.shape))
                  for lg in self.logs.values()}
        fields.update(self.build.protocol.fields)     # the evaluation protocol's metrics (protocols.py)
        if start > 0:
            self.results = store.Results.reopen(run_dir, start, fields, list(PHASES), self.comm.size)
        else:
            attrs = {"config": self.cfg.to_toml(), "algorithm": self.cfg.algorithm,
                     "dataset": self.cfg.data.dataset, "partition": self.cfg.data.partition,
                     "seed": self.cfg.seed, "world_size": self.comm.size, "n_clients": self.N,
                     "n_classes": self.dataset.n_classes, "n_rounds": self.rounds,
                     "config_hash": self.run_hash, "dp_noise_multiplier": self.build.dp_noise,
                     "dp_delta": self.cfg.dp.delta,
                     "dp_epsilon": np.nan if self.build.dp_epsilon is None else self.build.dp_epsilon[-1],
                     **self._dp_attrs(), **self.build.protocol.attrs}
            self.results = store.Results(run_dir, attrs, self.build.partition_arrays(), list(PHASES), fields)
            self.results.create()         # every round's row reserved; the file exists from now on
        store.write_text(run_dir / "config.toml", self.cfg.to_toml())   # the full config, readable

    def _dp_attrs(self) -> dict:
        """What the ε of a DP run means (docs/privacy.md): mechanism, sensitivity, neighbours, accountant."""
        if self.build.dp_epsilon is None:
            return {}
        d = self.cfg.dp
        return {"dp_mechanism": d.mechanism, "dp_clip": d.clip, "dp_sensitivity": self.build.dp_sensitivity,
                "dp_neighbours": dp.NEIGHBOURS, "dp_accountant": dp.ACCOUNTANT,
                "dp_accounting_version": dp.library_version(),
                "dp_orders": dp.orders()}

    # ------------------------------------------------------------------ one round
    def _round(self, r: int) -> None:
        t_round = time.perf_counter()
        phase = dict.fromkeys(PHASES, 0.0)

        def timed(name, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            phase[name] += time.perf_counter() - t
            return out

        N, A = self.N, self.arrays
        part = np.zeros(N, np.int32)
        if self.root:
            part[timed("server", self.server.participants, r)] = 1
        is_part = timed("comm", self.comm.bcast, part).astype(bool)
        participants = np.flatnonzero(is_part)
        evaluated = evaluated_clients(self.cfg, r, self.rounds, is_part)      # the same on every rank
        everyone = bool(evaluated.all())

        # down: what the participants train from (and the others may be evaluated with)
        fit_payload = timed("server", self.server.configure_fit, r, participants) if self.root else None
        down, bytes_down = timed("comm", self.transport.down, A.fit_down, fit_payload)
        timed("prepare", self.client.prepare, r, down)

        # clients: the participants train and upload
        hosted_part = self.mine[is_part[self.mine]]
        hosted_eval = np.flatnonzero(evaluated[self.mine])        # positions in self.mine
        bar = self._progress_bar(r, len(hosted_part) + len(hosted_eval))
        t = time.perf_counter()
        uploads = {}
        for block in self.client.blocks(hosted_part.tolist()):
            ups = self.client.fit_block([self.states[c] for c in block], [self.build.data[c] for c in block], r,
                                        block, [down[c] for c in block])
            for c, up in zip(block, ups, strict=True):
                _check_finite(r, c, up, "upload")
                uploads[c] = up
            bar.update(len(block))
        phase["train"] += time.perf_counter() - t

        # up: one Gatherv per declared array; the server turns them into its next state
        got, bytes_up = timed("comm", self.transport.up, A.up, participants, uploads)
        eval_payload = None
        if self.root:
            timed("server", self.server.aggregate_fit, r, participants, got)
            eval_payload = timed("server", self._configure_evaluate, r, evaluated)
        eval_down, eval_bytes = timed("comm", self.transport.down, A.eval_down, eval_payload)
        timed("prepare", self.client.prepare, r, eval_down)

        # the round's evaluated clients (every one by default) on their own test splits
        client_logs = [lg for lg in self.logs.values() if lg.side == "client"]
        n_dom = len(self.dataset.domain_names)
        evaluator, protocol = self.build.evaluator, self.build.protocol
        width = 3 + n_dom + sum(int(np.prod(lg.shape)) for lg in client_logs) + protocol.width
        metrics = np.full((len(self.mine), width), np.nan, np.float32)
        t = time.perf_counter()
        row = {int(self.mine[i]): i for i in hosted_eval.tolist()}      # client id -> its metrics row
        if evaluator is not None and row:
            evaluator.begin_round(r, [down, eval_down])
        for block in self.client.blocks(list(row)):
            states, datas = [self.states[c] for c in block], [self.build.data[c] for c in block]
            downs = [{**down[c], **eval_down[c]} for c in block]
            results = self.client.evaluate_block(states, datas, r, block, downs)
            if evaluator is not None:       # the protocol's scores, in the last columns
                metrics[[row[c] for c in block], width - protocol.width:] = evaluator.evaluate(
                    self.client, r, block, states, datas, downs)
            for c, res in zip(block, results, strict=True):
                if len(self.build.data[c].test_y):
                    _check_finite(r, c, {"test loss": res.loss}, "evaluation")
                i = row[c]
                metrics[i, :3] = res.accuracy, res.macro_f1, res.loss
                metrics[i, 3:3 + n_dom] = self.build.domain_accuracy(c, res.correct)
                at = 3 + n_dom
                for lg in client_logs:
                    size = int(np.prod(lg.shape))
                    value = np.asarray(res.logs.get(lg.name, []), np.float32).reshape(-1)
                    metrics[i, at:at + size] = lg.fill
                    metrics[i, at:at + len(value)] = value
                    at += size
            bar.update(len(block))
        phase["eval"] += time.perf_counter() - t
        bar.close()

        metrics = timed("comm", self.comm.gatherv, metrics, [int(n) * width for n in self.transport.hosted])
        phase_row = np.array([phase[p] for p in PHASES], np.float32)
        phases = self.comm.gatherv(phase_row, [len(PHASES)] * self.comm.size)
        if not self.root:
            return
        t = time.perf_counter()
        metrics = metrics.reshape(N, width)
        logs, at = dict(timed("server", self.server.logs)), 3 + n_dom
        if not everyone:        # a client that neither trained nor was evaluated has no server-side value
            idle = ~(is_part | evaluated)
            for lg in self.logs.values():
                if lg.side == "server" and lg.name in logs:
                    logs[lg.name] = np.array(logs[lg.name], copy=True)
                    logs[lg.name][idle] = lg.fill
        for lg in client_logs:
            size = int(np.prod(lg.shape))
            logs[lg.name] = metrics[:, at:at + size].reshape(N, *lg.shape).astype(lg.dtype)
            at += size
        for name, f in protocol.fields.items():      # columns in field order (protocols.Protocol)
            size = int(np.prod(f.shape))
            logs[name] = metrics[:, at:at + size].reshape(N, *f.shape)
            at += size
        self.results.append(store.RoundRecord(
            accuracy=metrics[:, 0], macro_f1=metrics[:, 1], loss=metrics[:, 2], participated=is_part,
            domain_accuracy=metrics[:, 3:3 + n_dom], bytes_up=bytes_up, bytes_down=bytes_down + eval_bytes,
            phase_time=phases.reshape(self.comm.size, len(PHASES)), wall_time=time.perf_counter() - t_round,
            dp_epsilon=self.build.dp_spent(r, len(participants)), logs=logs,
            evaluated=evaluated))
        self._line = store.round_line(r, self.rounds, metrics[:, 0], len(participants), int(evaluated.sum()), N,
                                      time.perf_counter() - t_round, digits=1)      # printed once committed
        slowest = phases.reshape(self.comm.size, len(PHASES)).max(0)
        log.debug("round %d: slowest rank's seconds %s; bytes up %d, down %d", r + 1,
                  ", ".join(f"{p} {s:.2f}" for p, s in zip(PHASES, slowest)), int(bytes_up.sum()),
                  int((bytes_down + eval_bytes).sum()))
        self.results.add_time(time.perf_counter() - t)

    def _configure_evaluate(self, r: int, evaluated: np.ndarray) -> dict:
        """The server's evaluation payloads, restricted to the clients evaluated this round; a round
        that evaluates nobody asks the server nothing."""
        if not evaluated.any():
            return {}
        out = self.server.configure_evaluate(r, evaluated)
        return out if evaluated.all() else {k: _only(p, evaluated) for k, p in out.items()}

    def _progress_bar(self, r: int, steps: int):
        """Clients trained and evaluated so far, on a terminal, when rank 0 hosts the clients."""
        from tqdm import tqdm
        show = self.cfg.run.progress and self.root and self.comm.size == 1 and sys.stderr.isatty()
        return tqdm(total=steps, desc=f"round {r + 1}/{self.rounds}", unit="client-step", leave=False,
                    disable=not show)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"clients/state": (self.N, self.build.state_size)}
        for k, v in self.server.state_dict().items():
            if v.size:          # an entry empty at the start (nothing aggregated yet) may be filled later
                shapes[f"server/{k}"] = v.shape
        return shapes

    def _blocks(self) -> tuple[int, int]:
        """(clients per rank per block, blocks): client states move between the ranks and the
        checkpoint a block at a time, at most CHECKPOINT_BLOCK_BYTES on rank 0 (the same on every rank)."""
        per = max(1, CHECKPOINT_BLOCK_BYTES // (4 * max(1, self.build.state_size) * max(1, self.comm.size - 1)))
        most = int(self.transport.hosted.max()) if len(self.transport.hosted) else 0
        return per, -(-most // per)

    def _block_ids(self, b: int, per: int) -> np.ndarray:
        """Rank 0: the client ids of block b, in the order Gatherv/Scatterv lay the ranks' rows."""
        if self._owned is None:
            self._owned = [np.flatnonzero(self.transport.owner == r) for r in range(self.comm.size)]
        return np.concatenate([ids[b * per:(b + 1) * per] for ids in self._owned])

    def _checkpoint(self, run_dir: Path, rounds_done: int) -> None:
        """Rank 0 writes checkpoint.h5 as the client states arrive, a block at a time from every rank
        (no rank holds more than a block of stacked states; rank 0 never the whole (N, S) array)."""
        S, t = self.build.state_size, time.perf_counter()
        per, steps = self._blocks()

        def blocks():
            buf = np.empty((min(per, len(self.mine)), S), np.float32)     # one block, reused
            for b in range(steps):
                ids = self.mine[b * per:(b + 1) * per]
                local = buf[:len(ids)]
                for i, c in enumerate(ids):
                    local[i] = self.client.state_vector(self.states[int(c)])
                counts = [max(0, min(per, int(n) - b * per)) * S for n in self.transport.hosted]
                got = self.comm.gatherv(local, counts)
                if self.root:
                    block = self._block_ids(b, per)
                    yield block, got.reshape(len(block), S)

        if self.root:
            server = {f"server/{k}": v for k, v in self.server.state_dict().items()}
            store.write_checkpoint(run_dir, rounds_done, self.cfg.to_toml(), self.run_hash, server,
                                   {"clients/state": ((self.N, S), blocks())})
            self.checkpoints.append((rounds_done, time.perf_counter() - t, (run_dir / store.CHECKPOINT).stat().st_size))
        else:
            for _ in blocks():
                pass

    def _restore(self, ckpt: dict | None) -> None:
        S = self.build.state_size
        per, steps = self._blocks()
        for b in range(steps):
            ids = self.mine[b * per:(b + 1) * per]
            send = None
            if self.root:
                rows, want = ckpt["clients/state"], self._block_ids(b, per)
                send = rows.rows(want) if isinstance(rows, store.CheckpointRows) else rows[want]
            recv = np.empty((len(ids), S), np.float32)
            self.comm.scatterv(send, [max(0, min(per, int(n) - b * per)) * S for n in self.transport.hosted], recv)
            for i, c in enumerate(ids):
                self.client.load_state_vector(self.states[int(c)], recv[i])
        if self.root:
            prefix = "server/"
            self.server.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)})
