"""run.threads defaults to 1 torch thread per rank (issue 19): `pfedmoap run` in one process then
runs what `mpiexec -n 3 pfedmoap run` runs, bit for bit, without anyone setting threads; 0 (all
cores) is an explicit choice. OMP_NUM_THREADS is unset here so that torch's own default (every
core) is what the old default of 0 took in one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
# no run.threads: the default is what is tested
SMALL = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=4",
         "data.n_train=200", "data.n_test=80", "data.min_size=5", "data.cache_dir=", "rounds=2",
         "train.local_epochs=1", "train.frac=0.5", "moe.n_experts=3", "algorithm=pfedmoap",
         "prompt.n_ctx=4", "run.progress=false"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(ranks: int, out: Path, sets=SMALL) -> None:
    cmd = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(([MPIEXEC, "-n", str(ranks)] if ranks else []) + cmd, capture_output=True, text=True,
                       timeout=600, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]


def test_the_default_is_one_thread_in_one_process(tmp_path):
    import torch
    from pfedmoap import cli
    before = torch.get_num_threads()
    torch.set_num_threads(2)                  # what torch takes by itself on a machine with 2+ cores
    try:
        args = ["run", "--out", str(tmp_path / "one")]
        for s in [*SMALL, "rounds=1"]:
            args += ["--set", s]
        assert cli.main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside the venv's python")
def test_one_process_equals_three_ranks_with_the_default_threads(tmp_path):
    _run(0, tmp_path / "one")
    _run(3, tmp_path / "three")
    with h5py.File(tmp_path / "one" / "results.h5") as a, h5py.File(tmp_path / "three" / "results.h5") as b:
        assert a.attrs["world_size"] == 1 and b.attrs["world_size"] == 3
        assert sorted(a["rounds"]) == sorted(b["rounds"])
        for key in a["rounds"]:
            if key.endswith("_time"):           # wall seconds
                continue
            np.testing.assert_array_equal(a["rounds"][key][()], b["rounds"][key][()], err_msg=key)
