#!/usr/bin/env bash
# The README's site-MPI recipe, followed literally with Debian's Open MPI standing in for a site
# MPI, then the same tiny run under Open MPI (mpirun) and under pip's MPICH (the dev venv's
# mpiexec): their results must be equal bit for bit.
#
#   tools/check_site_mpi.sh [WORK_DIR]     (needs apt and about 10 minutes on 2 cores; run as root)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/site-mpi-check}
mkdir -p "$work" && cd "$work"
command -v mpicc >/dev/null || { apt-get update -qq && apt-get install -y -qq openmpi-bin libopenmpi-dev; }

# --- the README's recipe (CPU-only torch line left out: it needs download.pytorch.org) -------------
python3 -m venv .venv && source .venv/bin/activate
pip install -q -e "$repo"
pip uninstall -y mpich || true
MPICC=$(which mpicc) pip install -q --no-binary=mpi4py --force-reinstall --no-cache-dir mpi4py
pip check
deactivate

# --- the same run under both MPIs ---------------------------------------------------------------
sets=(--set model.name=tiny-clip --set model.pretrained= --set data.dataset=synthetic --set data.n_clients=6
      --set data.n_train=300 --set data.n_test=120 --set data.min_size=5 --set data.cache_dir= --set rounds=3
      --set train.local_epochs=1 --set train.frac=0.5 --set run.threads=1 --set algorithm=pfedmoap
      --set prompt.n_ctx=4 --set moe.n_experts=3)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
mpirun --allow-run-as-root --oversubscribe -n 3 .venv/bin/python -m pfedmoap.cli info | grep -a "MPI library"
mpirun --allow-run-as-root --oversubscribe -n 3 .venv/bin/python -m pfedmoap.cli run --out ompi --if-exists overwrite "${sets[@]}" >/dev/null
"$repo/.venv/bin/mpiexec" -n 3 "$repo/.venv/bin/python" -m pfedmoap.cli info | grep -a "MPI library"
"$repo/.venv/bin/mpiexec" -n 3 "$repo/.venv/bin/python" -m pfedmoap.cli run --out mpich --if-exists overwrite "${sets[@]}" >/dev/null
"$repo/.venv/bin/python" - <<'PY'
import numpy as np
from pfedmoap import store
a, b = store.read_results("ompi"), store.read_results("mpich")
assert a["attrs"]["world_size"] == b["attrs"]["world_size"] == 3
keys = ("accuracy", "macro_f1", "loss", "experts", "gate_weight", "participated", "bytes_up", "bytes_down")
for k in keys:
    assert np.array_equal(a["rounds"][k], b["rounds"][k], equal_nan=True), k
print("Open MPI and MPICH results equal bit for bit:", ", ".join(keys))
PY
