#!/usr/bin/env bash
# Submit a job script of jobs/ with the directory its log goes to made first, and (sweep) the
# --array that covers ALGORITHMS x SEEDS.
#
#   jobs/submit.sh SCRIPT [sbatch options...]
#   jobs/submit.sh jobs/cpu.sbatch --ntasks=8
#   ALGORITHMS="promptfl pfedmoap" SEEDS="0 1 2" jobs/submit.sh jobs/sweep.sbatch   # --array=0-5
#   jobs/submit.sh jobs/sweep.sbatch --array=0-14%4    # an --array you give is kept as it is
#
# SLURM opens the job's log (#SBATCH --output=logs/...) relative to the job's working directory
# (--chdir, else the current directory) and does not create missing directories: without logs/
# the job fails at launch with no log at all. This makes that logs/ and then runs
# `sbatch [--array=0-N] OPTIONS... SCRIPT`; its output and exit status are sbatch's.
# Environment knobs (CONFIG, OUT, SETS, ...) pass through to sbatch as usual.
set -euo pipefail

if (($# < 1)) || [[ $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
script=$1; shift
[[ -f $script ]] || { echo "error: $script: no such job script" >&2; exit 2; }

chdir=. output="" has_array=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    a=${args[i]}
    case $a in
        --chdir=*) chdir=${a#--chdir=} ;;
        -D|--chdir) chdir=${args[i + 1]:-.} ;;
        -D*) chdir=${a#-D} ;;
        --output=*|--error=*) output=${a#*=} ;;
        -o|-e|--output|--error) output=${args[i + 1]:-} ;;
        --array=*|-a|--array|-a*) has_array=1 ;;
        --) break ;;
    esac
done

# the directory of the log: an --output you give, else the script's #SBATCH --output
[[ -n $output ]] || output=$(sed -n 's/^#SBATCH[[:space:]]\{1,\}\(--output\|-o\)[= ]\([^[:space:]]*\).*/\2/p' "$script" | tail -n1)
if [[ $output == */* ]]; then
    logdir=${output%/*}
    [[ $logdir == /* ]] || logdir=$chdir/$logdir
    [[ $logdir == *%* ]] || mkdir -p "$logdir"    # a directory named by a pattern: left to you
fi

extra=()
if [[ -z $has_array ]] && grep -q 'SLURM_ARRAY_TASK_ID' "$script"; then
    read -ra algorithms <<< "${ALGORITHMS:-zeroshot local promptfl fedprox pfedmoap}"
    read -ra seeds <<< "${SEEDS:-0 1 2}"
    n=$((${#algorithms[@]} * ${#seeds[@]}))
    ((n > 0)) || { echo "error: ALGORITHMS='${ALGORITHMS:-}' SEEDS='${SEEDS:-}': expected at least one algorithm and one seed" >&2; exit 2; }
    extra=(--array="0-$((n - 1))")
    echo "submit.sh: ${#algorithms[@]} algorithms x ${#seeds[@]} seeds: ${extra[0]}" >&2
fi
exec "${SBATCH:-sbatch}" ${extra[@]+"${extra[@]}"} "$@" "$script"
