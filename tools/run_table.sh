#!/usr/bin/env bash
# One paper table on this machine: every run of TABLE (rows x columns x seeds, from the tables
# file) one after the other in one process, then the table in the paper's layout.
#
#   tools/run_table.sh TABLE OUTDIR [--set KEY=VALUE ...] [--tables FILE] [--index I ...]
#   tools/run_table.sh fewshot runs/paper --set data.root=$DATA --set model.pretrained=$W/RN50.pt
#   RANKS=4 tools/run_table.sh domainnet runs/paper --set model.device=cuda ...   # mpiexec -n 4
#
# Runs go to OUTDIR/TABLE/<column>/<row>/seed<k>; a run already complete there is kept (it is
# resumed: nothing left to do), a stopped or interrupted one continues from its checkpoint, so the
# same command finishes an interrupted table. --set applies to every run (it wins over the table's
# own settings, except the seed). Afterwards OUTDIR/TABLE/table.txt, table.csv and table.tex hold
# `pfedmoap report --table TABLE` in its three formats; the text one is printed.
# `pfedmoap table list` names the tables; `pfedmoap table runs TABLE` lists a table's runs.
#
# Knobs: RANKS (MPI ranks per run; 1 = a plain process), PFEDMOAP (the program, default
# pfedmoap), MPIEXEC (the launcher, default mpiexec), IF_EXISTS (resume; or refuse, overwrite).
set -euo pipefail

if (($# < 2)) || [[ $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
table=$1 out=$2; shift 2
read -ra prog <<< "${PFEDMOAP:-pfedmoap}"
report_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do          # the report needs the same tables file
    case ${args[i]} in
        --tables) report_args+=(--tables "${args[i + 1]:-}") ;;
        --tables=*) report_args+=("${args[i]}") ;;
    esac
done
launch=()
if ((${RANKS:-1} > 1)); then
    read -ra launch <<< "${MPIEXEC:-mpiexec}"
    launch+=(-n "$RANKS")
fi
${launch[@]+"${launch[@]}"} "${prog[@]}" run --table "$table" --out "$out" \
    --if-exists "${IF_EXISTS:-resume}" "$@"
dir=$out/$table
for fmt in csv latex table; do
    ext=${fmt/latex/tex}; ext=${ext/table/txt}
    "${prog[@]}" report --table "$table" ${report_args[@]+"${report_args[@]}"} --format "$fmt" "$dir" \
        > "$dir/table.$ext"
done
cat "$dir/table.txt"
echo "written: $dir/table.txt $dir/table.csv $dir/table.tex"
