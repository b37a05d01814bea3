"""`pfedmoap report --follow RUN_DIR` (issue 16): each round printed once, as it lands, read from the
file the run is writing; the printed numbers are the final file's; it ends with the run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pfedmoap import store

pytestmark = pytest.mark.slow          # whole federated runs in subprocesses (README: quick subset)

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ROUNDS = 12
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=6",
        "data.n_train=600", "data.n_test=120", "data.min_size=5", "data.cache_dir=", f"rounds={ROUNDS}",
        "train.local_epochs=2", "train.frac=0.5", "moe.n_experts=3", "run.threads=1", "algorithm=pfedmoap",
        "prompt.n_ctx=4", "run.eval_every=2", "run.eval_clients=participants"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pfedmoap.cli", *args]


def _lines(proc: subprocess.Popen, into: list) -> threading.Thread:
    """Collect (time, line) of a process's stdout as they arrive."""
    def read():
        for line in proc.stdout:
            into.append((time.monotonic(), line.rstrip("\n")))
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_follow_prints_every_round_of_a_live_run_once(tmp_path):
    out = tmp_path / "run"
    follower = subprocess.Popen(_cli("report", "--follow", str(out)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)       # before the run exists
    lines: list = []
    reader = _lines(follower, lines)
    args = _cli("run", "--out", str(out))
    for s in SETS:
        args += ["--set", s]
    run = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    finished = time.monotonic()
    assert run.returncode == 0, run.stderr[-2000:]
    assert follower.wait(timeout=60) == 0, follower.stderr.read()[-2000:]
    reader.join(timeout=10)

    printed = [(t, line) for t, line in lines if line.startswith("round ")]
    data = store.read_results(out)
    rd = data["rounds"]
    want = [store.round_line(r, ROUNDS, rd["accuracy"][r], int(rd["participated"][r].sum()),
                             int(rd["evaluated"][r].sum()), rd["accuracy"].shape[1], float(rd["wall_time"][r]),
                             digits=2) for r in range(ROUNDS)]
    assert [line for _, line in printed] == want            # every round once, in order, the file's numbers
    assert "mean accuracy - (no client evaluated)" in want[0] and "evaluated" not in want[-1]
    # read while the run wrote it: the first rounds were printed before the run ended
    assert printed[0][0] < finished
    assert lines[-1][1] == f"# run complete: {ROUNDS} of {ROUNDS} rounds"
    # the numbers behind a line: mean accuracy over the evaluated clients, in percent
    r = ROUNDS - 1
    assert f"{100 * np.nanmean(rd['accuracy'][r]):.2f}%" in want[r]


def test_follow_ends_on_a_stopped_run_and_reads_a_finished_one(tmp_path):
    out = tmp_path / "stopped"
    args = _cli("run", "--out", str(out))
    for s in [s for s in SETS if not s.startswith("rounds=")] + ["rounds=400"]:
        args += ["--set", s]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    follower = subprocess.Popen(_cli("report", "--follow", str(out)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    lines: list = []
    reader = _lines(follower, lines)
    deadline = time.monotonic() + 300
    while not any(line.startswith("round 2/") for _, line in lines):
        assert time.monotonic() < deadline and run.poll() is None and follower.poll() is None
        time.sleep(0.1)
    run.send_signal(signal.SIGUSR1)              # checkpoint and stop after the current round
    assert run.wait(timeout=300) == 75
    assert follower.wait(timeout=60) == 0
    reader.join(timeout=10)
    done = store.read_results(out, rounds=False)["attrs"]["rounds_done"]
    rounds = [line for _, line in lines if line.startswith("round ")]
    assert len(rounds) == done and rounds[-1].startswith(f"round {done}/400")
    assert lines[-1][1] == f"# run stopped: {done} of 400 rounds; resume with: pfedmoap resume {out}"
    # a finished run: every round at once, then the end
    again = subprocess.run(_cli("report", "--follow", str(out)), capture_output=True, text=True, env=ENV, timeout=60)
    assert again.returncode == 0 and again.stdout.splitlines()[:-1] == rounds


def test_follow_waits_for_a_run_and_ctrl_c_ends_it(tmp_path):
    follower = subprocess.Popen(_cli("report", "--follow", str(tmp_path / "not-yet")), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(2)
    assert follower.poll() is None                           # waiting for the file to appear
    follower.send_signal(signal.SIGINT)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 130 and "Traceback" not in err
    p = subprocess.run(_cli("report", "--follow", str(tmp_path / "a"), str(tmp_path / "b")), capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: report --follow: follows one run directory")
