"""results.h5 appended in place (issue 16): a kill at any moment leaves a file that opens with every
round reported complete (`rounds_done`), equal to an uninterrupted run's; a round's commit writes
its reserved rows and one attribute, nothing else; resume cuts the rounds past the checkpoint; older
files (schema 2) are carried over."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfedmoap import store

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
PHASES = ["comm", "prepare", "train", "eval", "write", "server"]

# A writer of synthetic rounds through store.Results, the same in a subprocess (killed) and here.
WRITER = r'''
import sys
import numpy as np
from pfedmoap import store

PHASES = ["comm", "prepare", "train", "eval", "write", "server"]
LOGS = {"experts": store.Field(np.int32, "", "expert ids", (3,)),
        "gate_weight": store.Field(np.float32, "", "gating", (4,))}


def results(run_dir, n_clients, n_rounds):
    attrs = dict(config="seed = 1\n", algorithm="pfedmoap", dataset="synthetic", partition="iid", seed=1,
                 world_size=1, n_clients=n_clients, n_classes=10, n_rounds=n_rounds, config_hash="0" * 16)
    part = {"n_train": np.arange(n_clients, dtype=np.int32), "classnames": ["a", "b"],
            "domain_names": ["all"], "test_domain_counts": np.ones((n_clients, 1), np.int32)}
    return store.Results(run_dir, attrs, part, PHASES, LOGS)


def record(r, n_clients):
    g = np.random.default_rng(r)
    N = n_clients
    ev = g.random(N) < 0.7
    acc = np.where(ev, g.random(N, np.float32), np.nan).astype(np.float32)
    return store.RoundRecord(
        accuracy=acc, macro_f1=acc * 0.5, loss=g.random(N, np.float32), participated=g.random(N) < 0.1,
        domain_accuracy=acc[:, None], bytes_up=g.integers(0, 10**6, N), bytes_down=g.integers(0, 10**6, N),
        phase_time=g.random((1, len(PHASES)), np.float32), wall_time=float(r), dp_epsilon=float(r) / 10,
        logs={"experts": g.integers(-1, N, (N, 3)).astype(np.int32), "gate_weight": g.random((N, 4), np.float32)},
        evaluated=ev)


def write_rounds(res, n_clients, start, stop, say=None):
    for r in range(start, stop):
        res.append(record(r, n_clients))
        res.write("complete" if r == int(res.attrs["n_rounds"]) - 1 else None)
        if say:
            say(r + 1)


if __name__ == "__main__":
    run_dir, N, R = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    res = results(run_dir, N, R)
    res.create()
    print("created", flush=True)
    write_rounds(res, N, 0, R, lambda n: print(n, flush=True))
    res.close()
'''
lib: dict = {}
exec(compile(WRITER, "append_log_writer", "exec"), lib)     # noqa: S102 - our own code, shared with the subprocess

N_CLIENTS, N_ROUNDS = 3000, 400


def _writer(run_dir: Path, n_clients: int = N_CLIENTS, n_rounds: int = N_ROUNDS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(n_clients), str(n_rounds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _rows(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:          # plain h5py, default file locking
        attrs = {k: store._plain(v) for k, v in f.attrs.items()}
        rounds = {k: v[()] for k, v in f["rounds"].items()}
    return attrs, rounds


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    p = _writer(out)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    attrs, rounds = _rows(out / store.RESULTS)
    assert attrs["rounds_done"] == N_ROUNDS and attrs["status"] == "complete"
    return rounds


@pytest.mark.slow
def test_a_kill_at_random_moments_leaves_every_reported_round(uninterrupted, tmp_path):
    rng = random.Random(16)
    kills = 0
    for trial in range(6):
        out = tmp_path / f"k{trial}"
        out.mkdir()
        proc = _writer(out)
        assert proc.stdout.readline().strip() == "created"
        target, reported = rng.randrange(0, N_ROUNDS - 100), 0
        while reported < target:                    # let it commit some rounds, then kill it somewhere
            reported = int(proc.stdout.readline())  # in the next ones (a round takes milliseconds)
        time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        printed, _ = proc.communicate(timeout=60)
        reported = max([reported] + [int(x) for x in printed.split()])   # rounds the writer said were written
        kills += proc.returncode == -signal.SIGKILL
        attrs, rounds = _rows(out / store.RESULTS)
        done = attrs["rounds_done"]
        # every round reported complete is there; at most the one being written when killed beyond
        assert reported <= done <= reported + 1, (reported, done)
        assert attrs["status"] == ("complete" if done == N_ROUNDS else "running")
        for k, ref in uninterrupted.items():
            np.testing.assert_array_equal(rounds[k][:done], ref[:done], err_msg=f"{k}, trial {trial}")
        data = store.read_results(out)                      # the package's reader: rows cut to rounds_done
        assert all(len(v) == done for k, v in data["rounds"].items() if k != "phases")
    assert kills == 6                                       # every trial was killed mid-run


def test_a_commit_writes_its_rows_and_rounds_done_only(tmp_path):
    """The structure is fixed at creation: the file does not grow, and between two commits only the
    round's reserved chunks and the 8 bytes of rounds_done change (the cost of a round does not
    depend on the rounds already written)."""
    n, rounds = 40, 8
    res = lib["results"](tmp_path, n, rounds)
    res.create()
    path = tmp_path / store.RESULTS
    size = path.stat().st_size
    with h5py.File(path, "r", locking=False) as f:       # the writer (this process) holds it open
        chunks = [(ci.byte_offset, ci.byte_offset + ci.size) for ds in f["rounds"].values()
                  for ci in (ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks()))]
    in_chunks = np.zeros(size, bool)
    for a, b in chunks:
        in_chunks[a:b] = True
    before = np.frombuffer(path.read_bytes(), np.uint8)
    for r in range(rounds - 1):                       # every commit but the last (which sets status)
        lib["write_rounds"](res, n, r, r + 1)
        after = np.frombuffer(path.read_bytes(), np.uint8)
        assert len(after) == size
        changed = np.flatnonzero(after != before)
        outside = changed[~in_chunks[changed]]
        assert len(outside) and outside.max() - outside.min() < 8, outside     # rounds_done only
        before = after
    res.close()


@pytest.mark.slow
def test_a_stopped_log_is_cut_and_a_resumed_one_continues_exactly(uninterrupted, tmp_path):
    n, rounds = N_CLIENTS, N_ROUNDS
    res = lib["results"](tmp_path, n, rounds)
    res.create()
    lib["write_rounds"](res, n, 0, 10)
    res.attrs["status"] = "stopped"
    res.write("stopped")
    res.close()
    attrs, got = _rows(tmp_path / store.RESULTS)
    assert attrs["status"] == "stopped" and attrs["rounds_done"] == 10
    assert all(len(v) == 10 for v in got.values())                    # reserved rows cut
    # resumed from a checkpoint of round 7: rounds 8-10 are cut and computed again
    res = store.Results.reopen(tmp_path, 7, lib["LOGS"], PHASES, 1)
    assert res.rounds_done == 7 and len(res.mean_accuracy) == 7
    lib["write_rounds"](res, n, 7, rounds)
    res.close()
    attrs, got = _rows(tmp_path / store.RESULTS)
    assert attrs["status"] == "complete" and attrs["rounds_done"] == rounds
    for k, ref in uninterrupted.items():
        np.testing.assert_array_equal(got[k], ref, err_msg=k)


def test_a_schema_2_log_is_carried_over_on_resume(tmp_path):
    """A file written whole by an older pfedmoap: rows copied, every client evaluated, per-rank
    timings widened to the new world size and mapped by phase name."""
    N, R = 5, 4
    g = np.random.default_rng(0)
    old = {"accuracy": g.random((R, N), np.float32), "participated": g.random((R, N)) < 0.5,
           "experts": g.integers(-1, N, (R, N, 2)).astype(np.int32),
           "phase_time": g.random((R, 2, 5), np.float32), "wall_time": g.random(R).astype(np.float32)}
    with h5py.File(tmp_path / store.RESULTS, "w") as f:
        f.attrs.update(schema_version=2, package_version="0.1", config="seed = 1\n", algorithm="pfedmoap",
                       dataset="synthetic", partition="iid", seed=1, world_size=2, start_time="x", n_clients=N,
                       n_classes=3, n_rounds=6, rounds_done=R, status="running", config_hash="0" * 16)
        f.create_group("partition").create_dataset("n_train", data=np.ones(N, np.int32))
        for k, v in old.items():
            f.create_dataset(f"rounds/{k}", data=v)
        f["rounds/phase_time"].attrs["phases"] = ["comm", "prepare", "train", "eval", "write"]
    logs = {"experts": store.Field(np.int32, "", "", (2,))}
    res = store.Results.reopen(tmp_path, 3, logs, PHASES, 3)
    res.close()
    data = store.read_results(tmp_path)
    assert data["attrs"]["schema_version"] == store.RESULTS_SCHEMA and data["attrs"]["rounds_done"] == 3
    assert data["attrs"]["world_size"] == 3
    rd = data["rounds"]
    for k in ("accuracy", "participated", "experts", "wall_time"):
        np.testing.assert_array_equal(rd[k], old[k][:3], err_msg=k)
    assert rd["evaluated"].shape == (3, N) and rd["evaluated"].all()
    assert rd["phases"] == PHASES and rd["phase_time"].shape == (3, 3, 6)
    np.testing.assert_array_equal(rd["phase_time"][:, :2, :5], old["phase_time"][:3])
    assert np.isnan(rd["phase_time"][:, 2]).all() and np.isnan(rd["phase_time"][:, :, 5]).all()
    assert np.isnan(rd["dp_epsilon"]).all()
    # the file keeps the rows of the 6 planned rounds reserved for the resumed run
    with h5py.File(tmp_path / store.RESULTS, "r") as f:
        assert f["rounds/accuracy"].shape == (6, N) and f["rounds/accuracy"].maxshape == (None, N)


# ------------------------------------------------------------------------ a real run, killed

SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=6",
        "data.n_train=240", "data.n_test=120", "data.min_size=5", "data.cache_dir=", "rounds=40",
        "train.local_epochs=1", "train.frac=0.5", "moe.n_experts=3", "run.threads=1", "algorithm=pfedmoap",
        "prompt.n_ctx=4", "run.checkpoint_every=3"]
SCIENCE = ("accuracy", "macro_f1", "loss", "participated", "evaluated", "experts", "gate_weight",
           "bytes_up", "bytes_down")


def _run_args(out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out), *extra]
    for s in SETS:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_run_keeps_its_rounds_and_resumes_exactly(tmp_path):
    ref = tmp_path / "ref"
    p = subprocess.run(_run_args(ref), capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    _, want = _rows(ref / store.RESULTS)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_run_args(out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    seen = 0
    for line in proc.stdout:                 # a round's console line is printed once it is committed
        seen += line.startswith("round ")
        if seen == 2 + random.Random(7).randrange(20):
            break
    time.sleep(random.Random(8).uniform(0, 0.3))
    proc.kill()
    proc.wait()
    attrs, got = _rows(out / store.RESULTS)
    done = attrs["rounds_done"]
    assert seen <= done < 40 and attrs["status"] == "running"          # every round printed is there
    for k in SCIENCE:
        np.testing.assert_array_equal(got[k][:done], want[k][:done], err_msg=k)
    ckpt_round = store.read_checkpoint(out)[0]["round"]
    assert ckpt_round <= done                      # the log is never behind the checkpoint

    p = subprocess.run([sys.executable, "-m", "pfedmoap.cli", "resume", str(out)], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    attrs, got = _rows(out / store.RESULTS)
    assert attrs["status"] == "complete" and attrs["rounds_done"] == 40
    for k in SCIENCE:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
