"""Checkpoints and exact resume: a stopped run resumed (at another rank count) ends exactly as an
uninterrupted one; bad checkpoints are refused with one line and exit 2, nothing overwritten."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slow          # whole federated runs in subprocesses (README: quick subset)

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=4",
        "data.n_train=240", "data.n_test=80", "data.min_size=5", "data.cache_dir=", "rounds=6",
        "train.local_epochs=1", "train.frac=0.75", "moe.n_experts=3", "run.threads=1",
        "algorithm=pfedmoap", "prompt.n_ctx=4", "run.checkpoint_every=2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _args(*extra, sets=SETS):
    a = [sys.executable, "-m", "pfedmoap.cli", *extra]
    for s in sets:
        a += ["--set", s]
    return a


def _rounds(run_dir):
    with h5py.File(Path(run_dir) / "results.h5") as f:
        return {k: f["rounds"][k][()] for k in f["rounds"]}, dict(f.attrs)


def _ckpt(run_dir):
    with h5py.File(Path(run_dir) / "checkpoint.h5") as f:
        arrays = {}
        f.visititems(lambda k, v: arrays.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        return arrays, dict(f.attrs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = subprocess.run(_args("run", "--out", str(out)), capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_stop_on_signal_then_resume_at_another_rank_count_is_exact(reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_args("run", "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "results.h5").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    rounds, attrs = _rounds(out)
    ckpt, cattrs = _ckpt(out)
    assert attrs["status"] == "stopped"
    assert cattrs["round"] == attrs["rounds_done"] < 6

    p = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "pfedmoap.cli", "resume", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got, gattrs = _rounds(out)
    ref, _ = _rounds(reference)
    assert gattrs["status"] == "complete" and gattrs["rounds_done"] == 6
    for k in ("accuracy", "macro_f1", "loss", "participated", "experts", "gate_weight", "bytes_up", "bytes_down"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)       # replaced, not duplicated
    a, _ = _ckpt(out)
    b, _ = _ckpt(reference)
    for k in ("clients/state", "server/global_prompt", "server/pool", "server/in_pool"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_run_on_an_existing_run_dir_refuses_then_resumes_or_overwrites(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = (out / "results.h5").read_bytes()
    p = subprocess.run(_args("run", "--out", str(out)), capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "--if-exists" in p.stderr
    assert (out / "results.h5").read_bytes() == before
    # resuming a finished run has nothing left to do and changes no result
    p = subprocess.run(_args("run", "--out", str(out), "--if-exists", "resume"), capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    np.testing.assert_array_equal(_rounds(out)[0]["accuracy"], _rounds(reference)[0]["accuracy"])
    sets = [s for s in SETS if not s.startswith("rounds=")] + ["rounds=1"]
    p = subprocess.run(_args("run", "--out", str(out), "--if-exists", "overwrite", sets=sets), capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _rounds(out)[1]["rounds_done"] == 1


def _refused(run_dir: Path, *needles):
    before = {n: (run_dir / n).read_bytes() for n in ("results.h5", "checkpoint.h5")}
    p = subprocess.run([sys.executable, "-m", "pfedmoap.cli", "resume", str(run_dir)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0]
    assert {n: (run_dir / n).read_bytes() for n in before} == before     # nothing overwritten


def test_truncated_checkpoint_is_refused(reference, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(reference, out)
    data = (out / "checkpoint.h5").read_bytes()
    (out / "checkpoint.h5").write_bytes(data[: len(data) // 3])
    _refused(out, "checkpoint")


def test_foreign_file_as_checkpoint_is_refused(reference, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(reference, out)
    with h5py.File(out / "checkpoint.h5", "w") as f:
        f["x"] = np.arange(3)
    _refused(out, "not a pfedmoap checkpoint")


def test_checkpoint_of_another_config_or_schema_is_refused(reference, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        f.attrs["config_hash"] = "0123456789abcdef"
    _refused(out, "different configuration")
    with h5py.File(out / "checkpoint.h5", "r+") as f:
        f.attrs["schema_version"] = 99
    _refused(out, "schema version 99")


def test_killed_mid_run_leaves_a_readable_checkpoint(tmp_path):
    out = tmp_path / "k"
    sets = [s for s in SETS if not s.startswith(("rounds=", "run.checkpoint_every"))] + ["rounds=400",
                                                                                          "run.checkpoint_every=1"]
    proc = subprocess.Popen(_args("run", "--out", str(out), sets=sets), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not (out / "checkpoint.h5").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.5)                    # several more checkpoint writes, then kill at a random moment
    proc.kill()
    proc.wait()
    ckpt, attrs = _ckpt(out)           # still a complete, readable file
    assert attrs["round"] >= 1 and ckpt["clients/state"].shape[0] == 4
    assert not np.isnan(ckpt["clients/state"]).any()
