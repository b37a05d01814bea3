"""The CLI's console as a user meets it: output into a pipe whose reader left (`| head`), a re-run
refused before any set-up, headers and help texts that say what is true."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TINY = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=3",
        "data.n_train=90", "data.n_test=30", "data.min_size=5", "data.cache_dir=", "rounds=3",
        "train.local_epochs=1", "run.threads=1", "algorithm=promptfl", "prompt.n_ctx=2",
        "run.checkpoint_every=1"]


def _env(tmp_path):
    # TMPDIR: where comm.fail would leave a traceback file for a crash
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))


def _into_closed_pipe(args, tmp_path, launcher=()):
    """Run `pfedmoap ARGS` with stdout a pipe whose reader is already gone: every write fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*launcher, sys.executable, "-m", "pfedmoap.cli", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=_env(tmp_path), timeout=300)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [["table", "list"], ["table", "runs", "fewshot"],
                                  ["data", "check", "--dataset", "digits"], ["report", "RUN"]])
def test_a_reader_that_leaves_ends_the_output_quietly(tmp_path, args):
    """`pfedmoap table runs fewshot | head`: no BrokenPipeError traceback, no traceback file."""
    from test_analysis import write_run
    write_run(tmp_path / "runs", "one", schema_version=3)
    args = [str(tmp_path / "runs" / "one") if a == "RUN" else a for a in args]
    p = _into_closed_pipe(args, tmp_path)
    assert p.stderr == "" and p.returncode == 128 + signal.SIGPIPE, p.stderr[-2000:]
    assert not list(tmp_path.glob("*.traceback"))


def test_a_run_whose_reader_leaves_stops_at_the_round_end_with_its_checkpoint(tmp_path):
    """In one process (under mpiexec the closed pipe is mpiexec's own, and MPICH's mpiexec dies
    of SIGPIPE itself; the ranks' stop is the SIGTERM path, agreed by every rank)."""
    out = tmp_path / "run"
    args = ["run", "--out", str(out)] + [x for s in TINY for x in ("--set", s)]
    p = _into_closed_pipe(args, tmp_path)
    assert p.returncode == 75, p.stderr[-3000:]           # federation.EXIT_STOPPED: requeue-able
    assert p.stderr.strip() == f"# stdout closed: stopping after this round; resume with: pfedmoap resume {out}"
    with h5py.File(out / "results.h5") as f:
        assert f.attrs["status"] == "stopped" and f.attrs["rounds_done"] == 1
    assert (out / "checkpoint.h5").exists() and not list(tmp_path.glob("*.traceback"))


def test_a_rerun_is_refused_before_any_set_up(tmp_path):
    """The quick-start into a directory that holds its runs: one line, and no data set, model or
    federation was built for it (federation is never imported)."""
    for name in ("zeroshot", "pfedmoap"):
        (tmp_path / "qs" / name).mkdir(parents=True)
        (tmp_path / "qs" / name / "results.h5").write_bytes(b"")
    code = ("import sys; from pfedmoap.cli import main; rc = main(['run', '--out', sys.argv[1]]); "
            "print(rc, 'pfedmoap.federation' in sys.modules, 'pfedmoap.build' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "qs")], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=300)
    assert p.stdout.split() == ["2", "False", "False"], p.stderr[-2000:]
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {tmp_path / 'qs'}/")
    assert "already holds a run (and 1 more of this command's" in line
    assert "--if-exists resume" in line and "--if-exists overwrite" in line


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_a_rerun_under_mpi_is_one_line_from_one_rank(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.h5").write_bytes(b"")
    args = [MPIEXEC, "-n", "3", sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    p = subprocess.run(args + [x for s in TINY for x in ("--set", s)], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=300)
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error")] == [
        f"error: {out}: already holds a run; pass --if-exists resume to continue or --if-exists "
        "overwrite to start again, or choose another --out"], p.stderr
    assert p.stdout == ""             # no header: nothing was set up


def test_the_header_says_the_rounds_the_method_runs():
    from pfedmoap import config
    from pfedmoap.cli import _header
    one = config.load(None, ["algorithm=zeroshot", "rounds=5", "data.n_clients=1"])
    assert ", 1 client, 1 round, world size 1 " in _header(one, 1)
    many = config.load(None, ["algorithm=promptfl", "rounds=5"])
    assert ", 10 clients, 5 rounds, world size 3 " in _header(many, 3)


def test_data_check_help_lists_its_options_and_the_data_sets():
    from pfedmoap.cli import main
    from pfedmoap.data.datasets import available
    p = subprocess.run([sys.executable, "-m", "pfedmoap.cli", "data", "check", "--help"],
                       capture_output=True, text=True, timeout=120)
    text = " ".join(p.stdout.split())          # argparse wraps lines
    assert p.returncode == 0 and main is not None
    for option in ("--dataset NAME the data set: one of", "--root DIR", "--set KEY=VALUE"):
        assert option in text, text
    assert all(name in text for name in available())
