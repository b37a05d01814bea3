"""The SLURM job scripts on a real (private, single-node) SLURM: a plain run, and a run that is
signalled mid-way, requeues itself, resumes from its checkpoint and ends with the same results;
`scontrol requeue` and `scancel` (SIGTERM) each logged as what SLURM then does; the sweep refusing
to start without an array index, and jobs/submit.sh submitting it with logs/ and the --array made.

Runs on the private SLURM of tools/slurm_local.sh and never on any other (a site's SLURM would get
real jobs): the tests neither install nor start anything. Bring it up first (root; `.ci/run` does):
    eval "$(tools/slurm_local.sh)"          # installs SLURM from Debian if needed, starts it
Skipped with the reason when it is not up; set PFEDMOAP_REQUIRE_SLURM=1 to make that a failure
instead. Deselect with `-m "not slurm"` (they are also `slow`).

Knobs: PFEDMOAP_SLURM_TEST_CMD (the program the job scripts run; default: this venv's pfedmoap),
PFEDMOAP_SLURM_TEST_SETS (overrides; default "rounds=4 algorithm=pfedmoap train.local_epochs=1
seed=0").  Takes about 1.5 minutes plus twice the quick-start's run time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"
CPU_JOB = REPO / "jobs" / "cpu.sbatch"
SWEEP_JOB = REPO / "jobs" / "sweep.sbatch"
SUBMIT = REPO / "jobs" / "submit.sh"
VENV = Path(sys.prefix)
BIN = Path(sys.executable).parent
SETS = os.environ.get(
    "PFEDMOAP_SLURM_TEST_SETS", "rounds=4 algorithm=pfedmoap train.local_epochs=1 seed=0"
)
ROUNDS = int(dict(kv.split("=", 1) for kv in SETS.split())["rounds"])
NTASKS = 2
JOB_TIMEOUT = 900  # seconds for one job, requeue included
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REQUEUE_HOLD", "SPECIAL_EXIT"}


def _unavailable(reason: str):
    if os.environ.get("PFEDMOAP_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@lru_cache(maxsize=None)
def _program() -> str:
    cmd = os.environ.get("PFEDMOAP_SLURM_TEST_CMD")
    if cmd:
        return cmd
    exe = BIN / "pfedmoap"
    if not exe.exists():
        pytest.skip(f"no pfedmoap executable beside {sys.executable}")
    probe = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"`pfedmoap run --help` failed: {(probe.stderr or probe.stdout).strip()[-300:]}")
    return str(exe)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment (dict) for sbatch/scontrol against the private SLURM, which must be up."""
    if not sys.platform.startswith("linux"):
        _unavailable("SLURM test needs Linux")
    _program()  # skips before touching SLURM if there is no program to run
    state = os.environ.get("SLURM_LOCAL_DIR", "/tmp/pfedmoap-slurm")
    env = dict(os.environ, SLURM_LOCAL_DIR=state)
    if not all(shutil.which(t) for t in ("sbatch", "scontrol", "sinfo")):
        _unavailable('no SLURM here (sbatch, scontrol or sinfo missing); bring up the private one '
                     'with `eval "$(tools/slurm_local.sh)"` (root; it installs SLURM from Debian), as .ci/run does')
    up = subprocess.run([str(SLURM_LOCAL), "status"], env=env, capture_output=True, timeout=60)
    if up.returncode != 0:
        _unavailable(f"the private SLURM of tools/slurm_local.sh is not up (state in {state}); "
                     'start it with `eval "$(tools/slurm_local.sh)"` (root), as .ci/run does')
    conf = subprocess.run([str(SLURM_LOCAL), "conf"], env=env, capture_output=True, text=True, timeout=60)
    m = re.search(r"export SLURM_CONF=(\S+)", conf.stdout)
    assert m, f"no SLURM_CONF in: {conf.stdout!r}"
    env["SLURM_CONF"] = m.group(1)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    jobs: list[str] = []
    try:
        yield {"env": env, "jobs": jobs, "dir": tmp_path_factory.mktemp("slurm")}
    finally:  # cancel what we submitted (the daemons stay as they were)
        for j in jobs:
            subprocess.run(["scancel", j], env=env, capture_output=True, timeout=60)


def _job_env(slurm, out: Path) -> dict:
    env = dict(slurm["env"])
    env.update(PFEDMOAP_VENV=str(VENV), PFEDMOAP_CMD=_program(), OUT=str(out), SETS=SETS,
               CONFIG="", IF_EXISTS="")
    for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_TASK_ID",
              "SLURM_ARRAY_JOB_ID", "ALGORITHMS", "SEEDS"):  # if pytest runs inside a job
        env.pop(k, None)
    return env


def _submit(slurm, name: str, out: Path) -> tuple[str, Path]:
    log = slurm["dir"] / f"{name}.log"
    r = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", f"--ntasks={NTASKS}", "--nodes=1",
         "--time=30:00", f"--chdir={slurm['dir']}", f"--output={log}", str(CPU_JOB)],
        env=_job_env(slurm, out), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    job = r.stdout.strip().split(";")[0]
    slurm["jobs"].append(job)
    return job, log


def _job_info(slurm, job: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm["env"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait_done(slurm, job: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job_info(slurm, job)
        if info["JobState"] in TERMINAL:
            return info
        time.sleep(1)
    pytest.fail(f"job {job} not finished after {timeout} s (state {info['JobState']}):\n"
                f"{_tail(log)}")


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no job log)"


def _rounds_done(path: Path) -> int:
    """rounds_done of a results file that may be open for writing (0 if unreadable now)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("rounds_done", 0))
    except Exception:  # not there yet, or caught mid-write
        return 0


def _results(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {"status": str(f.attrs["status"]), "rounds_done": int(f.attrs["rounds_done"]),
                "accuracy": f["rounds/accuracy"][()], "loss": f["rounds/loss"][()]}


@pytest.fixture(scope="module")
def reference(slurm):
    """An uninterrupted run through jobs/cpu.sbatch, with `sbatch --wait`."""
    out = slurm["dir"] / "reference"
    log = slurm["dir"] / "reference.log"
    t0 = time.monotonic()
    name = f"reference-{os.getpid()}"
    try:
        r = subprocess.run(
            ["sbatch", "--wait", "--parsable", f"--job-name={name}", f"--ntasks={NTASKS}",
             "--nodes=1", "--time=30:00", f"--chdir={slurm['dir']}", f"--output={log}",
             str(CPU_JOB)],
            env=_job_env(slurm, out), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], env=slurm["env"], capture_output=True,
                       timeout=60)
        pytest.fail(f"sbatch --wait did not return in {JOB_TIMEOUT} s:\n{_tail(log)}")
    job = r.stdout.strip().split(";")[0]
    if job:
        slurm["jobs"].append(job)
    return {"rc": r.returncode, "stderr": r.stderr, "job": job, "out": out, "log": log,
            "seconds": time.monotonic() - t0}


def test_cpu_job_completes(slurm, reference):
    assert reference["rc"] == 0, (f"sbatch --wait exited {reference['rc']}: {reference['stderr']}"
                                  f"\n{_tail(reference['log'])}")
    info = _job_info(slurm, reference["job"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    res = _results(reference["out"] / "results.h5")
    assert res["status"] == "complete", _tail(reference["log"])
    assert res["rounds_done"] == ROUNDS
    assert res["accuracy"].shape[0] == ROUNDS and res["loss"].shape == res["accuracy"].shape


def _wait_first_round(slurm, job, log, out) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while _rounds_done(out / "results.h5") < 1:
        state = _job_info(slurm, job)["JobState"]
        if state in TERMINAL:
            pytest.fail(f"job {job} ended ({state}) before its first round:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no round written after {JOB_TIMEOUT} s:\n{_tail(log)}")
        time.sleep(0.5)


def test_preempted_job_requeues_and_resumes(slurm, reference):
    if reference["rc"] != 0:
        pytest.fail("the uninterrupted reference run failed; see test_cpu_job_completes")
    out = slurm["dir"] / "preempted"
    job, log = _submit(slurm, "preempted", out)

    # wait until at least one round is on disk, then signal the batch shell like SLURM does
    # before a time limit (--signal=B:USR1@...)
    _wait_first_round(slurm, job, log, out)
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm["env"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"scancel --signal=USR1 --batch failed: {r.stderr}"

    info = _wait_done(slurm, job, log)
    text = _tail(log, 20000)
    assert "program exited with 75" in text, (
        f"the run did not stop at the signal with exit code 75 (too few rounds left?):\n{text}")
    assert int(info.get("Restarts", 0)) >= 1, f"job was not requeued: {info}\n{text}"
    assert "--if-exists resume" in text, text
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"

    import numpy as np

    res = _results(out / "results.h5")
    ref = _results(reference["out"] / "results.h5")
    assert res["status"] == "complete" and res["rounds_done"] == ROUNDS, text
    np.testing.assert_array_equal(res["accuracy"], ref["accuracy"])
    np.testing.assert_array_equal(res["loss"], ref["loss"])


def test_scancel_stays_cancelled(slurm):
    """A plain `scancel` sends SIGTERM: the run checkpoints, and the job must not requeue itself."""
    out = slurm["dir"] / "cancelled"
    job, log = _submit(slurm, "cancelled", out)
    _wait_first_round(slurm, job, log, out)
    r = subprocess.run(["scancel", job], env=slurm["env"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"scancel failed: {r.stderr}"

    deadline = time.monotonic() + 120  # the batch shell has KillWait (30 s) before SIGKILL
    while "program exited with" not in _tail(log, 20000) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(20)  # longer than the private SLURM's requeue delay (cred_expire=10)
    info = _job_info(slurm, job)
    text = _tail(log, 20000)
    assert info["JobState"] == "CANCELLED", f"{info}\n{text}"
    assert int(info.get("Restarts", 0)) == 0, f"scancel'd job requeued itself: {info}\n{text}"
    assert "stopped by SIGTERM (scancel): not requeueing" in text, text
    assert "SLURM is requeueing" not in text, text
    res = _results(out / "results.h5")
    assert res["status"] == "stopped", f"SIGTERM did not checkpoint the run:\n{text}"
    assert (out / "checkpoint.h5").exists()


def test_scontrol_requeue_is_logged_as_a_requeue(slurm):
    """`scontrol requeue` sends SIGTERM: the run checkpoints and exits 75, SLURM requeues the job
    itself, and the log says so (it used to say "not requeueing")."""
    out = slurm["dir"] / "requeued"
    job, log = _submit(slurm, "requeued", out)
    _wait_first_round(slurm, job, log, out)
    r = subprocess.run(["scontrol", "requeue", job], env=slurm["env"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"scontrol requeue failed: {r.stderr}"

    info = _wait_done(slurm, job, log)
    text = _tail(log, 20000)
    first = text.split("--if-exists resume")[0]  # the segment that got the SIGTERM
    assert "program exited with 75" in first, text
    assert f"stopped by SIGTERM: SLURM is requeueing job {job} itself" in first, text
    assert "not requeueing" not in text, text
    assert "requeueing job" not in first.replace("SLURM is requeueing job", ""), (
        f"the script requeued the job a second time:\n{text}")
    assert int(info.get("Restarts", 0)) == 1, f"{info}\n{text}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    res = _results(out / "results.h5")
    assert res["status"] == "complete" and res["rounds_done"] == ROUNDS, text


def _sweep_env(slurm, out: Path, algorithms: str, seeds: str) -> dict:
    env = _job_env(slurm, out)
    env.update(ALGORITHMS=algorithms, SEEDS=seeds)
    return env


def test_sweep_without_array_index_refuses_in_one_line(slurm):
    """No --array (the script has no default any more): one job, one error line, exit 2, nothing
    run and no run directory."""
    out = slurm["dir"] / "sweep-noarray"
    log = slurm["dir"] / "sweep-noarray.log"
    r = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--job-name=sweep-noarray", f"--ntasks={NTASKS}",
         "--nodes=1", "--time=5:00", f"--chdir={slurm['dir']}", f"--output={log}",
         str(SWEEP_JOB)],
        env=_sweep_env(slurm, out, "zeroshot promptfl", "0 1 2"), capture_output=True, text=True,
        timeout=300)
    job = r.stdout.strip().split(";")[0]
    if job:
        slurm["jobs"].append(job)
    assert r.returncode == 2, f"sbatch --wait exited {r.returncode}: {r.stderr}\n{_tail(log)}"
    info = _job_info(slurm, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no array index") and "--array=0-5" in lines[0], lines
    assert not out.exists()


def test_submit_sh_makes_logs_dir_and_sweep_array(slurm):
    """jobs/submit.sh: logs/ made under --chdir, --array computed from ALGORITHMS x SEEDS (one log
    per pair, none left over), every run directory complete; the script's default --ntasks fits
    this node."""
    where = slurm["dir"] / "submit"
    where.mkdir()
    out = where / "sweep"
    extra = [] if (os.cpu_count() or 1) >= 2 else ["--overcommit"]
    r = subprocess.run(
        [str(SUBMIT), str(SWEEP_JOB), "--wait", "--parsable", "--job-name=sweep-submit",
         "--time=30:00", f"--chdir={where}", *extra],
        env=_sweep_env(slurm, out, "zeroshot", "0 1"), capture_output=True, text=True,
        timeout=JOB_TIMEOUT)
    job = r.stdout.strip().split(";")[0]
    if job:
        slurm["jobs"].append(job)
    logs = sorted((where / "logs").glob("*")) if (where / "logs").is_dir() else []
    text = "\n".join(f"{p}:\n{_tail(p)}" for p in logs)
    assert r.returncode == 0, f"submit.sh exited {r.returncode}: {r.stderr}\n{text}"
    assert "--array=0-1" in r.stderr
    assert [p.name for p in logs] == [f"sweep-submit-{job}_0.out", f"sweep-submit-{job}_1.out"]
    assert not any(where.glob("*.out")), "a log landed in the submit directory"
    for seed in (0, 1):
        res = _results(out / "zeroshot" / f"seed{seed}" / "results.h5")
        assert res["status"] == "complete" and res["rounds_done"] == 1, text
