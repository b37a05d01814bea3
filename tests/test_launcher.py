"""The launcher and MPI must agree on the number of processes; the install keeps one MPI.

An mpi4py built for one MPI, started by another MPI's launcher (pip's MPICH `mpiexec` with an Open
MPI mpi4py, or the reverse, or `srun` without a matching PMI), gives every process a world of one:
N independent copies of the same run writing into one directory, all exiting 0. The launcher's
environment says N; `comm.world()` refuses with one line naming both numbers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pfedmoap import comm
from pfedmoap.errors import PFedMoAPError

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MV2_", "SLURM_", "MPI_LOCALRANKID", "PFEDMOAP_MPI", "HYDRA_")

# the world as this process sees it, or the one line it was refused with
WORLD = """
import os
from pfedmoap import comm
from pfedmoap.errors import PFedMoAPError
try:
    line = f"size {comm.world().size}"
except PFedMoAPError as e:
    line = f"refused {e}"
os.write(1, (line + "\\n").encode())     # one write: the ranks' lines do not interleave
"""


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _world(**env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORLD], capture_output=True, text=True, timeout=120,
                          env=_clean_env(**env))


@pytest.fixture
def no_launcher(monkeypatch):
    for k in list(os.environ):
        if k.startswith(_PREFIXES):
            monkeypatch.delenv(k)
    return monkeypatch


# ------------------------------------------------------------------ a real process, not launched

def test_mpich_singleton_under_pmi_size_3_is_refused():
    """PMI_SIZE=3 as MPICH's hydra sets it, but no hydra behind it: MPICH starts a singleton
    (world size 1). That is exactly what a foreign launcher's processes see."""
    p = _world(PMI_SIZE="3", PMI_RANK="0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("refused "), p.stdout
    msg = p.stdout.strip()
    assert "\n" not in msg
    assert "launcher started 3 processes (PMI_SIZE=3)" in msg and "world size of 1" in msg
    assert "mpi4py" in msg and "MPI and clusters" in msg


@pytest.mark.parametrize("env, var", [
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE=2"),   # Open MPI's mpirun
    ({"MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_RANK": "0"}, "MV2_COMM_WORLD_SIZE=4"),
    # an srun step of 4 tasks without an MPI plugin's variables
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
      "SLURM_STEP_NUM_TASKS": "4"}, "SLURM_STEP_NUM_TASKS=4"),
])
def test_other_launchers_with_a_world_of_one_are_refused(env, var):
    p = _world(**env)
    assert p.stdout.startswith("refused "), (p.stdout, p.stderr)
    assert var in p.stdout
    # mpi4py's own multi-line "suspicious MPI execution environment" warning is not shown
    assert "suspicious" not in p.stderr, p.stderr


@pytest.mark.parametrize("env", [
    {},                                                     # no launcher at all
    {"PMI_SIZE": "1", "PMI_RANK": "0"},                     # mpiexec -n 1
    # inside an sbatch job, one process: SLURM_NTASKS says the allocation, not this launch
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_NNODES": "1"},
    # srun -n 1
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
     "SLURM_STEP_NUM_TASKS": "1"},
])
def test_one_process_is_fine(env):
    p = _world(**env)
    assert p.stdout.strip() == "size 1", (p.stdout, p.stderr)


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_matching_launcher_gives_the_world_it_started():
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", WORLD], capture_output=True, text=True,
                       timeout=120, env=_clean_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n").count("size 2") == 2, p.stdout


# ------------------------------------------------------------------ the CLI: one line, exit 2, once

def _cli(argv, **env):
    return subprocess.run([sys.executable, "-m", "pfedmoap.cli", *argv], capture_output=True, text=True,
                          timeout=180, env=_clean_env(**env), cwd=ROOT)


@pytest.fixture(scope="module")
def cli_runs():
    cases = {
        "rank0": (["info"], {"PMI_SIZE": "3", "PMI_RANK": "0"}),
        "rank1": (["info"], {"PMI_SIZE": "3", "PMI_RANK": "1"}),
        "ompi-usage": (["run", "--if-exists", "maybe"], {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(_cli, argv, **env) for k, (argv, env) in cases.items()}
        yield {k: f.result() for k, f in futures.items()}


def test_cli_refuses_a_foreign_launcher_in_one_line(cli_runs):
    p = cli_runs["rank0"]
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the launcher started 3 processes"), p.stderr
    assert "world size 1" not in p.stdout


def test_cli_only_the_launchers_rank_0_prints(cli_runs):
    """The N copies all fail alike; one line in the job's log, not N."""
    p = cli_runs["rank1"]
    assert p.returncode == 2 and p.stderr == "", p.stderr
    q = cli_runs["ompi-usage"]                     # argparse errors too, before MPI starts
    assert q.returncode == 2 and q.stderr == "", q.stderr


# ------------------------------------------------------------------ the environment, read in process

def test_launcher_size_prefers_the_mpi_launchers_own_variables(no_launcher):
    assert comm.launcher_size() is None and comm.launcher_rank() == 0
    no_launcher.setenv("SLURM_NTASKS", "8")               # an sbatch job: not evidence
    assert comm.launcher_size() is None
    for k, v in {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "2"}.items():
        no_launcher.setenv(k, v)                        # mpirun's daemons, started with srun
    assert comm.launcher_size() == (2, "SLURM_STEP_NUM_TASKS") and comm.launcher_rank() == 5
    no_launcher.setenv("OMPI_COMM_WORLD_SIZE", "16")
    no_launcher.setenv("OMPI_COMM_WORLD_RANK", "9")
    assert comm.launcher_size() == (16, "OMPI_COMM_WORLD_SIZE") and comm.launcher_rank() == 9


def test_srun_step_without_mpi_variables_counts_as_launched(no_launcher):
    assert not comm.launched_by_mpi()
    for k, v in {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}.items():
        no_launcher.setenv(k, v)
    assert not comm.launched_by_mpi()                   # srun -n 1: one process, no MPI needed
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", "3")
    assert comm.launched_by_mpi()


def test_check_world_size():
    comm.check_world_size(1, None)
    comm.check_world_size(1, (1, "PMI_SIZE"))
    comm.check_world_size(4, (4, "PMI_SIZE"))
    with pytest.raises(PFedMoAPError, match=r"started 4 processes \(PMI_SIZE=4\).*world size of 1"):
        comm.check_world_size(1, (4, "PMI_SIZE"))


# ------------------------------------------------------------------ packaging: one MPI per install

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_mpich_is_an_extra_not_a_dependency():
    project = _pyproject()
    assert "mpich" not in _names(project["dependencies"])      # a site-MPI install keeps one launcher
    assert "mpi4py" in _names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "mpich" in _names(extras["mpi"])
    assert {"mpich", "pytest"} <= _names(extras["dev"])        # the tests start real mpiexec runs


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^python3 -m venv \.venv && .*$", text, flags=re.M)


def test_readme_commands_and_ci():
    run, test = _readme_commands()[:2]
    assert ".venv/bin/pip install -e '.[mpi]'" in run and ".venv/bin/mpiexec" in run
    assert test == "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/pytest"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test
    # the services the tests use are prepared before, by CI, never by the tests (issue 19)
    assert any("tools/slurm_local.sh start" in line for line in ci[:-1])


def test_readme_documents_the_quick_subset_and_it_is_a_marker():
    text = (ROOT / "README.md").read_text()
    assert '.venv/bin/pytest -m "not slow"' in text
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    markers = [m.split(":")[0] for m in tool["pytest"]["ini_options"]["markers"]]
    assert {"slow", "slurm"} <= set(markers)


def test_readme_site_mpi_recipe():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### MPI and clusters"):]
    section = section[:section.index("\n## ")]
    block = re.search(r"```\n(.*?)```", section, flags=re.S).group(1)
    steps = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    order = ["source .venv/bin/activate", "pip uninstall -y mpich", "module load",
             "MPICC=$(which mpicc) pip install --no-binary=mpi4py --force-reinstall --no-cache-dir mpi4py",
             "pip check"]
    at = [next(i for i, s in enumerate(steps) if o in s) for o in order]
    assert at == sorted(at), steps
    assert any("--index-url https://download.pytorch.org/whl/cpu" in s for s in steps)
    assert not any(s.startswith("pip install") and "[mpi]" in s for s in steps)


def test_torch_is_a_range_that_admits_the_tested_release():
    """A range, not a pin (a cluster keeps its own torch), that admits what the suite runs on."""
    from importlib.metadata import version
    from packaging.requirements import Requirement
    reqs = {r.name: r for r in map(Requirement, _pyproject()["dependencies"])}
    for name in ("torch", "torchvision"):
        spec = reqs[name].specifier
        assert not any(s.operator == "==" for s in spec), spec
        assert version(name).split("+")[0] in spec, (name, version(name), spec)
