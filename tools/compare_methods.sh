#!/usr/bin/env bash
# Every method on the embedded quick-start benchmark, same partition and budget, over several
# seeds; then one report with mean ± std over the seeds.
#
#   tools/compare_methods.sh [OUT_DIR] [extra --set overrides...]
#   SEEDS="1 2 3" RANKS=1 tools/compare_methods.sh runs/beta0.1 data.beta=0.1
#
# Knobs: SEEDS (default "1 2 3"), RANKS (MPI ranks; 1 = plain process), PFEDMOAP (the program).
set -euo pipefail
out=${1:-runs/compare}; shift || true
prog=${PFEDMOAP:-pfedmoap}
sets=()
for s in "$@"; do sets+=(--set "$s"); done
for seed in ${SEEDS:-1 2 3}; do
    launch=()
    [[ ${RANKS:-1} -gt 1 ]] && launch=(mpiexec -n "$RANKS")
    "${launch[@]}" $prog run --out "$out/seed$seed" --if-exists overwrite --set seed="$seed" "${sets[@]}"
done
$prog report "$out"/seed*/*
