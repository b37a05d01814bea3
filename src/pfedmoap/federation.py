"""The round loop, written once and for every method: server side on rank 0, clients on every rank
that hosts them. With one process rank 0 hosts every client and the same code runs.

It knows no method: each round it asks the method's server part for the participants and the
downloads, moves the declared arrays (exchange.Transport), lets the client part train and evaluate
each hosted client, counts bytes, times phases and writes results and checkpoints (store).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import comm as comm_mod, store
from .algorithms.base import sample_participants  # noqa: F401  (re-exported for tools and tests)
from .build import Build
from .config import Config
from .errors import PFedMoAPError
from .exchange import Transport

PHASES = ("comm", "prepare", "train", "eval", "write")
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


def _check_finite(round_: int, cid: int, values: dict, what: str) -> None:
    """A NaN or infinity stops the run (exit 2, one line) before anything of this round is written:
    the last checkpoint stays the last good state and results.h5 is never marked complete."""
    for name, v in values.items():
        a = np.asarray(v)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise PFedMoAPError(f"round {round_ + 1}, client {cid}: {what} {name!r} is not finite "
                                f"(diverged? lower train.lr, check dp.noise_multiplier and moe.lam); "
                                f"the run stops, its last checkpoint is the last good state")


class Federation:
    def __init__(self, cfg: Config, comm, log=print):
        self.cfg, self.comm, self.log = cfg, comm, log
        self.root = comm.rank == 0
        b = self.build = Build(cfg, comm)
        self.dataset, self.partition, self.N = b.dataset, b.partition, b.N
        self.method, self.client = b.method, b.client
        self.arrays = self.method.arrays()
        self.logs = {lg.name: lg for lg in self.method.logs()}
        self.rounds = self.method.rounds()
        self.transport = Transport(comm, b.owner)
        self.mine = self.transport.mine
        self.server = self.method.server() if self.root else None
        self.states = {int(c): self.client.init_state(int(c)) for c in self.mine}
        self.results: store.Results | None = None

    # ------------------------------------------------------------------ run
    def run(self, run_dir: str | Path, if_exists: str = "refuse") -> Outcome:
        run_dir = Path(run_dir)
        start, ckpt, error, self.lock = 0, None, None, None
        if self.root:
            try:
                start, ckpt, self.lock = store.open_run(run_dir, if_exists, self.cfg.hash(),
                                                        self._checkpoint_shapes())
                self._open_results(run_dir, start)
            except PFedMoAPError as e:
                error = e
                if self.lock is not None:
                    self.lock.release()
        comm_mod.agree(self.comm, error)
        try:
            return self._rounds(run_dir, start, ckpt)
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
                self.results.write(status)
            if last or stop or (every and (r + 1) % every == 0):
                self._checkpoint(run_dir, r + 1)
            if self.root:      # rank 0's writing time belongs to the round just written
                self.results.add_time(time.perf_counter() - t)
                if status:     # the final file carries the final timings too
                    self.results.write(status)
            if stop:
                outcome.status = "stopped"
                break
        if self.root:
            outcome.mean_accuracy = [float(np.nanmean(rec.accuracy)) for rec in self.results.records]
            counts = self.results.partition["test_domain_counts"]
            hits = np.nansum(self.results.records[-1].domain_accuracy * counts, axis=0)
            outcome.domain_accuracy = {name: float(hits[j] / counts[:, j].sum())
                                       for j, name in enumerate(self.dataset.domain_names) if counts[:, j].sum()}
        return outcome

    def _open_results(self, run_dir: Path, start: int) -> None:
        store.write_text(run_dir / "config.toml", self.cfg.to_toml())   # the full config, readable
        fields = {lg.name: store.Field(np.dtype(lg.dtype).type, "", lg.description) for lg in self.logs.values()}
        if start > 0:
            self.results = store.Results.reopen(run_dir, start, fields)
        else:
            attrs = {"config": self.cfg.to_toml(), "algorithm": self.cfg.algorithm,
                     "dataset": self.cfg.data.dataset, "partition": self.cfg.data.partition,
                     "seed": self.cfg.seed, "world_size": self.comm.size, "n_clients": self.N,
                     "n_classes": self.dataset.n_classes, "n_rounds": self.rounds,
                     "config_hash": self.cfg.hash(), "dp_noise_multiplier": self.build.dp_noise,
                     "dp_delta": self.cfg.dp.delta,
                     "dp_epsilon": np.nan if self.build.dp_epsilon is None else self.build.dp_epsilon[-1]}
            self.results = store.Results(run_dir, attrs, self.build.partition_arrays(), list(PHASES), fields)
        self.results.attrs["world_size"] = self.comm.size

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
            part[self.server.participants(r)] = 1
        is_part = timed("comm", self.comm.bcast, part).astype(bool)
        participants = np.flatnonzero(is_part)

        # down: what the participants train from (and the others may be evaluated with)
        down, bytes_down = timed("comm", self.transport.down, A.fit_down,
                                 self.server.configure_fit(r, participants) if self.root else None)
        timed("prepare", self.client.prepare, r, down)

        # clients: the participants train and upload
        bar = self._progress_bar(r, int(is_part[self.mine].sum()) + len(self.mine))
        t = time.perf_counter()
        uploads = {}
        for c in self.mine:
            if is_part[c]:
                bar.update()
                uploads[int(c)] = self.client.fit(self.states[int(c)], self.build.data[int(c)], r, int(c), down[int(c)])
                _check_finite(r, int(c), uploads[int(c)], "upload")
        phase["train"] += time.perf_counter() - t

        # up: one Gatherv per declared array; the server turns them into its next state
        got, bytes_up = timed("comm", self.transport.up, A.up, participants, uploads)
        if self.root:
            self.server.aggregate_fit(r, participants, got)
        eval_down, eval_bytes = timed("comm", self.transport.down, A.eval_down,
                                      self.server.configure_evaluate(r) if self.root else None)
        timed("prepare", self.client.prepare, r, eval_down)

        # every hosted client is evaluated on its own test split
        client_logs = [lg for lg in self.logs.values() if lg.side == "client"]
        n_dom = len(self.dataset.domain_names)
        width = 3 + n_dom + sum(int(np.prod(lg.shape)) for lg in client_logs)
        metrics = np.full((len(self.mine), width), np.nan, np.float32)
        t = time.perf_counter()
        for i, c in enumerate(self.mine):
            bar.update()
            c = int(c)
            res = self.client.evaluate(self.states[c], self.build.data[c], r, c, {**down[c], **eval_down[c]})
            if len(self.build.data[c].test_y):
                _check_finite(r, c, {"test loss": res.loss}, "evaluation")
            metrics[i, :3] = res.accuracy, res.macro_f1, res.loss
            metrics[i, 3:3 + n_dom] = self.build.domain_accuracy(c, res.correct)
            at = 3 + n_dom
            for lg in client_logs:
                size = int(np.prod(lg.shape))
                value = np.asarray(res.logs.get(lg.name, []), np.float32).reshape(-1)
                metrics[i, at:at + size] = lg.fill
                metrics[i, at:at + len(value)] = value
                at += size
        phase["eval"] += time.perf_counter() - t
        bar.close()

        metrics = timed("comm", self.comm.gatherv, metrics, [int(n) * width for n in self.transport.hosted])
        phase_row = np.array([phase[p] for p in PHASES], np.float32)
        phases = self.comm.gatherv(phase_row, [len(PHASES)] * self.comm.size)
        if not self.root:
            return
        t = time.perf_counter()
        metrics = metrics.reshape(N, width)
        logs, at = dict(self.server.logs()), 3 + n_dom
        for lg in client_logs:
            size = int(np.prod(lg.shape))
            logs[lg.name] = metrics[:, at:at + size].reshape(N, *lg.shape).astype(lg.dtype)
            at += size
        self.results.append(store.RoundRecord(
            accuracy=metrics[:, 0], macro_f1=metrics[:, 1], loss=metrics[:, 2], participated=is_part,
            domain_accuracy=metrics[:, 3:3 + n_dom], bytes_up=bytes_up, bytes_down=bytes_down + eval_bytes,
            phase_time=phases.reshape(self.comm.size, len(PHASES)), wall_time=time.perf_counter() - t_round,
            dp_epsilon=np.nan if self.build.dp_epsilon is None else self.build.dp_epsilon[r], logs=logs))
        self.log(f"round {r + 1}/{self.rounds}  mean accuracy {100 * np.nanmean(metrics[:, 0]):.2f}%  "
                 f"participants {len(participants)}/{N}  {time.perf_counter() - t_round:.1f}s")
        self.results.add_time(time.perf_counter() - t)

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

    def _checkpoint(self, run_dir: Path, rounds_done: int) -> None:
        S = self.build.state_size
        local = np.stack([self.client.state_vector(self.states[int(c)]) for c in self.mine]) \
            if len(self.mine) else np.zeros((0, S), np.float32)
        states = self.comm.gatherv(local, [int(n) * S for n in self.transport.hosted])
        if self.root:
            arrays = {"clients/state": states.reshape(self.N, S),
                      **{f"server/{k}": v for k, v in self.server.state_dict().items()}}
            store.write_checkpoint(run_dir, rounds_done, self.cfg.to_toml(), self.cfg.hash(), arrays)

    def _restore(self, ckpt: dict | None) -> None:
        S = self.build.state_size
        recv = np.empty((len(self.mine), S), np.float32)
        self.comm.scatterv(ckpt["clients/state"] if self.root else None,
                           [int(n) * S for n in self.transport.hosted], recv)
        for i, c in enumerate(self.mine):
            self.client.load_state_vector(self.states[int(c)], recv[i])
        if self.root:
            prefix = "server/"
            self.server.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)})
