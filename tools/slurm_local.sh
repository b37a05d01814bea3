#!/usr/bin/env bash
# Bring up (or tear down) a real, private, single-node SLURM on this machine, for testing the
# job scripts in jobs/.  Needs root and apt-get (Debian/Ubuntu); no systemd needed.
#
#   eval "$(tools/slurm_local.sh)"        # start (idempotent); prints `export SLURM_CONF=...`
#   tools/slurm_local.sh status           # exit 0 if it is up and the node is usable
#   tools/slurm_local.sh stop             # cancel its jobs, stop slurmd/slurmctld (and munged if
#                                         # this script started it)
#
# Knobs (environment, with defaults):
#   SLURM_LOCAL_DIR=/tmp/pfedmoap-slurm   state, spool, logs and slurm.conf live here
#   SLURM_LOCAL_CPUS=$(nproc)             CPUs the node advertises
#   SLURM_LOCAL_MEM_MB=<80% of RAM>       RealMemory of the node
#   SLURM_LOCAL_GPUS=0                    >0: advertise that many placeholder "gpu" GRES (device
#                                         nodes aliasing /dev/null under $SLURM_LOCAL_DIR/fakegpu),
#                                         so jobs/gpu.sbatch can be scheduled on a CPU-only box
#   SLURM_LOCAL_CRED_EXPIRE=10            seconds before a requeued job may start again (SLURM's
#                                         default, 120, makes requeue tests slow)
#   SLURM_LOCAL_TIMEOUT=60                seconds to wait for the node to become idle
#
# Only stdout is the export line; everything else goes to stderr.  Logs: $SLURM_LOCAL_DIR/log/.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/pfedmoap-slurm}
CONF=$DIR/slurm.conf
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
HOST=$(hostname -s)

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() {  # pid_alive FILE -> 0 if the pid in FILE is a live process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_gone() {  # wait_gone PID SECONDS
    local i
    for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    return 1
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM the recorded pid, KILL it after 10 s
    local f=$1 pid
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || { log "$2 still alive, SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
    rm -f "$f"
}

munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { SLURM_CONF=$CONF sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n1; }

up() { pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" \
       && SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm is not installed and this is not root"
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get"
    log "installing slurm-wlm with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurm-wlm >&2; then
        apt-get update -q >&2 || true
        apt-get install -y -q slurm-wlm >&2 || die "apt-get install slurm-wlm failed"
    fi
}

start_munge() {
    munge_ok && return 0
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key >&2
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 755 /run/munge
    log "starting munged"
    if id munge >/dev/null 2>&1; then runuser -u munge -- munged >&2; else munged --force >&2; fi
    local i
    for ((i = 0; i < 50; i++)); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not come up"
    # remember that we started it, so `stop` stops only what it started
    pgrep -u munge -n -x munged > "$DIR/munged.pid" 2>/dev/null || true
}

write_conf() {
    local cpus=${SLURM_LOCAL_CPUS:-$(nproc)} mem=${SLURM_LOCAL_MEM_MB:-}
    local gpus=${SLURM_LOCAL_GPUS:-0} gres_node="" gres_types=""
    [[ -n $mem ]] || mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    if ((gpus > 0)); then
        gres_types="GresTypes=gpu"
        gres_node="Gres=gpu:$gpus"
        # count-only GPU GRES is not accepted; point each "GPU" at a placeholder file
        rm -rf "$DIR/fakegpu"; mkdir -p "$DIR/fakegpu"
        : > "$DIR/gres.conf"
        local g
        for ((g = 0; g < gpus; g++)); do
            [[ -e $DIR/fakegpu/nvidia$g ]] || mknod "$DIR/fakegpu/nvidia$g" c 1 3 2>/dev/null || : > "$DIR/fakegpu/nvidia$g"
            echo "NodeName=$HOST Name=gpu File=$DIR/fakegpu/nvidia$g" >> "$DIR/gres.conf"
        done
    else
        rm -f "$DIR/gres.conf"
    fi
    cat > "$CONF" <<EOF
# written by tools/slurm_local.sh -- a private single-node test cluster
ClusterName=pfedmoap-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$gres_types
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install
    mkdir -p "$DIR"
    if up; then
        log "already running ($CONF)"
    else
        # a half-up previous instance: stop what is left, start clean
        stop_pidfile "$DIR/slurmd.pid" slurmd
        stop_pidfile "$DIR/slurmctld.pid" slurmctld
        rm -rf "$DIR/state" "$DIR/spool"
        mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
        start_munge
        write_conf
        export SLURM_CONF=$CONF
        log "starting slurmctld and slurmd ($CONF)"
        slurmctld -f "$CONF" -i >&2 || die "slurmctld failed; see $DIR/log/slurmctld.log"
        slurmd -f "$CONF" >&2 || die "slurmd failed; see $DIR/log/slurmd.log"
    fi
    local i st=""
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        st=$(node_state || true)
        case $st in
            idle|mix|alloc|comp) break ;;
            down*|drain*|drng*|fail*)
                SLURM_CONF=$CONF scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case $st in
        idle|mix|alloc|comp) ;;
        *) die "node $HOST not usable after ${TIMEOUT}s (state '${st}'); see $DIR/log/" ;;
    esac
    log "node $HOST is $st"
    log "it has $(SLURM_CONF=$CONF sinfo -h -N -n "$HOST" -o %c 2>/dev/null | head -n1) CPUs: a job asking for more stays PENDING (PartitionConfig) unless it has --overcommit; the scripts in jobs/ log to logs/: mkdir -p logs first (or use jobs/submit.sh)"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    if [[ -f $CONF ]] && up; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            local i
            for ((i = 0; i < 40; i++)); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/munged.pid" munged
    log "stopped"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) up && [[ $(node_state) =~ ^(idle|mix|alloc|comp)$ ]] ;;
    conf) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 [start|stop|status|conf]" >&2; exit 2 ;;
esac
