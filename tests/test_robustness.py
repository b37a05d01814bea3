"""Issue 15: no silent loss (a run-directory lock), no wrong result marked complete (non-finite
values stop the run), one line and exit 2 on every rank, never a hang."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

pytestmark = pytest.mark.slow          # whole federated runs in subprocesses (README: quick subset)

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TINY = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=4",
        "data.n_train=200", "data.n_test=80", "data.min_size=5", "data.cache_dir=", "rounds=3",
        "train.local_epochs=1", "run.threads=1", "algorithm=pfedmoap", "prompt.n_ctx=4",
        "moe.n_experts=3", "moe.gating_dim=32", "moe.gating_heads=4"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _args(out, sets, ranks=0, extra=()):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out), *extra]
    for s in TINY + sets:
        args += ["--set", s]
    return ([MPIEXEC, "-n", str(ranks)] if ranks else []) + args


def _run(out, sets, ranks=0, timeout=120, extra=()):
    return subprocess.run(_args(out, sets, ranks, extra), capture_output=True, text=True, timeout=timeout, env=ENV)


def _errors(stderr):
    return [l for l in stderr.splitlines() if l.startswith("error")]


@pytest.mark.parametrize("ranks", [0, 3])
@pytest.mark.parametrize("sets, where", [(["train.lr=1e30", "train.warmup_epochs=0", "train.local_epochs=2"], "training loss"),
                                         (["dp.clip=1", "dp.noise_multiplier=1e30", "train.frac=0.5"], "not finite")])
def test_non_finite_values_stop_the_run_and_are_never_marked_complete(tmp_path, ranks, sets, where):
    if ranks and not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec")
    start = time.time()
    p = _run(tmp_path / "r", sets, ranks)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = _errors(p.stderr)
    # one line per failing rank (two client ranks may diverge at the same moment)
    assert 1 <= len(errors) <= max(1, ranks - 1), p.stderr
    assert all("round " in e and "client " in e and where in e for e in errors), p.stderr
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr
    assert time.time() - start < 60
    results = tmp_path / "r" / "results.h5"
    if results.exists():                     # rounds before the failure may have been written
        with h5py.File(results) as f:
            assert f.attrs["status"] != "complete"


def test_a_second_run_into_a_locked_directory_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "r"
    first = subprocess.Popen(_args(out, ["rounds=100000"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    deadline = time.time() + 60
    while not (out / "results.h5").exists():                   # the first run is writing rounds
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    # the dangerous case: overwrite would delete the first run's files while it writes them
    second = _run(out, ["rounds=100000"], timeout=60, extra=("--if-exists", "overwrite"))
    assert second.returncode == 2
    errors = _errors(second.stderr)
    assert len(errors) == 1 and "another run" in errors[0] and f"pid {first.pid}" in errors[0], second.stderr
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)                          # it checkpoints and stops cleanly
    _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err[-2000:]
    with h5py.File(out / "results.h5") as f:
        assert f.attrs["status"] == "stopped" and f.attrs["rounds_done"] >= 1
        assert f["rounds/accuracy"].shape[0] == f.attrs["rounds_done"]


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, sys, time\n"
                               f"f = open({str(out / '.pfedmoap.lock')!r}, 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\n"
                               "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert _run(out, [], timeout=60).returncode == 2          # held: refused
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    p = _run(out, [], timeout=120)                             # the lock file remains, its flock is gone
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / ".pfedmoap.lock") as f:                    # released at the end of the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_dp_budget_sets_the_noise_and_epsilon_is_logged_per_round(tmp_path):
    from pfedmoap import dp, store
    p = _run(tmp_path / "r", ["dp.clip=1", "dp.epsilon=25", "dp.delta=0.05", "train.frac=0.5"])
    assert p.returncode == 0, p.stderr[-2000:]
    res = store.read_results(tmp_path / "r")
    a, eps = res["attrs"], res["rounds"]["dp_epsilon"]
    sigma = dp.noise_for(25, 0.05, 0.5, 3)                   # 2 of 4 clients per round, 3 rounds
    assert a["dp_noise_multiplier"] == pytest.approx(sigma) and a["dp_delta"] == 0.05
    assert eps.shape == (3,) and (abs(eps - dp.epsilon_per_round(sigma, 0.5, 3, 0.05)) < 1e-9).all()
    assert eps[-1] <= 25 and eps[-1] == pytest.approx(25, rel=0.01) and (abs(eps[:-1]) < eps[-1]).all()


def test_dp_budget_and_noise_together_are_refused(tmp_path):
    p = _run(tmp_path / "r", ["dp.clip=1", "dp.epsilon=25", "dp.noise_multiplier=1"], timeout=60)
    assert p.returncode == 2 and _errors(p.stderr) == [
        "error: dp.epsilon > 0 needs dp.clip > 0 and dp.noise_multiplier = 0: give the budget or the noise, not both"]


def test_the_full_config_is_written_into_the_run_directory(tmp_path):
    from pfedmoap import config
    p = _run(tmp_path / "r", ["rounds=1"])
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = config.load(str(tmp_path / "r" / "config.toml"))
    assert cfg.rounds == 1 and cfg.model.name == "tiny-clip" and cfg.options.n_experts == 3
    assert len(p.stdout.splitlines()) < 40          # a short header, not the 70-line config


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    # RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk would (ENOSPC)
    import resource
    out = tmp_path / "r"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    p = subprocess.run(_args(out, ["rounds=50", "run.checkpoint_every=1"]), capture_output=True, text=True,
                       timeout=120, env=ENV, preexec_fn=limit)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = _errors(p.stderr)
    assert len(errors) == 1 and "could not be written" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Segmentation" not in p.stderr
    assert not list(out.glob("*.tmp"))
    for name in ("results.h5", "checkpoint.h5"):              # what was written before stays readable
        if (out / name).exists():
            with h5py.File(out / name) as f:
                assert len(f.attrs) > 0


@pytest.mark.parametrize("ranks", [0, 3])
def test_a_cache_dir_below_a_file_is_one_line_on_every_rank(tmp_path, ranks):
    if ranks and not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec")
    (tmp_path / "afile").write_text("x")
    start = time.time()
    p = _run(tmp_path / "r", [f"data.cache_dir={tmp_path / 'afile' / 'cache'}"], ranks, timeout=90)
    assert p.returncode == 2, p.stderr[-2000:]
    assert _errors(p.stderr) == [f"error: data.cache_dir '{tmp_path / 'afile' / 'cache'}': lies below "
                                 f"'{tmp_path / 'afile'}', which is a file; expected a directory"], p.stderr
    assert time.time() - start < 60
