#!/usr/bin/env bash
# Start a one-node Slurm cluster (munged, slurmctld, slurmd) on this Debian host for CI, without
# systemd. Safe to run twice: daemons already running are kept. The pid of each daemon this script
# starts goes to $SLURM_CI_STATE/<name>.pid, and .ci/slurm/stop.sh stops exactly those.
#
#   .ci/slurm/start.sh && python -m pytest -m slurm && .ci/slurm/stop.sh
set -euo pipefail
[ "$(id -u)" -eq 0 ] && AS_ROOT="" || AS_ROOT="sudo"
STATE="${SLURM_CI_STATE:-/tmp/snakedrp-slurm}"
WAIT_S="${SLURM_CI_WAIT_S:-60}"
NODE="$(hostname -s)"
CPUS="$(nproc)"
# leave 10 % of the memory to the OS and the submitting snakemake
MEM_MB="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
mkdir -p "$STATE"

if ! dpkg -s slurmctld slurmd slurm-client munge >/dev/null 2>&1; then
    $AS_ROOT apt-get update -qq
    $AS_ROOT env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

# munge's postinst normally writes the key; a minimal image may not have run it
if ! $AS_ROOT test -s /etc/munge/munge.key; then
    $AS_ROOT mungekey --create --force
    $AS_ROOT chown munge:munge /etc/munge/munge.key
    $AS_ROOT chmod 0400 /etc/munge/munge.key
fi

# Why these settings:
# - no accounting daemon: job status comes from squeue (profile: slurm-status-command: squeue), so
#   finished jobs must stay listed for a while (MinJobAge, >= 3 x the profile's init seconds);
# - DefMemPerCPU: a job that asks for no memory would otherwise take the whole node;
# - jobcomp/filetxt: one line per finished job, the CI's proof that jobs ran through Slurm.
$AS_ROOT mkdir -p /etc/slurm
$AS_ROOT tee /etc/slurm/slurm.conf >/dev/null <<CONF
# one-node CI cluster written by snakedrp .ci/slurm/start.sh
ClusterName=snakedrp-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=600
DefMemPerCPU=1000
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# /run is a tmpfs: the daemons' directories are gone after every boot
$AS_ROOT install -d -o munge -g munge -m 0755 /run/munge
$AS_ROOT install -d -o slurm -g slurm -m 0755 /run/slurm /var/lib/slurm/slurmctld /var/log/slurm
$AS_ROOT install -d -o root -g root -m 0755 /var/lib/slurm/slurmd

running() {  # running PIDFILE NAME: the pid in PIDFILE is a live process called NAME
    local pid
    pid="$($AS_ROOT cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && [ "$($AS_ROOT cat "/proc/$pid/comm" 2>/dev/null || true)" = "$2" ]
}
launch() {  # launch NAME PIDFILE COMMAND...: start a forking daemon unless running, record its pid
    local name="$1" pidfile="$2"; shift 2
    running "$pidfile" "$name" && return 0
    "$@"
    for _ in $(seq 50); do running "$pidfile" "$name" && break; sleep 0.1; done
    running "$pidfile" "$name" || { echo "slurm start: $name did not start" >&2; exit 1; }
    $AS_ROOT cat "$pidfile" >"$STATE/$name.pid"
}

if ! munge -n >/dev/null 2>&1; then
    launch munged /run/munge/munged.pid $AS_ROOT runuser -u munge -- /usr/sbin/munged
fi
launch slurmctld /run/slurm/slurmctld.pid $AS_ROOT /usr/sbin/slurmctld
launch slurmd /run/slurm/slurmd.pid $AS_ROOT /usr/sbin/slurmd

deadline=$((SECONDS + WAIT_S)); state=""
while [ $SECONDS -lt $deadline ]; do
    state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null || true)"
    case "$state" in
        idle) break ;;
        down*|drain*) $AS_ROOT scontrol update NodeName="$NODE" State=RESUME || true ;;
    esac
    sleep 0.5
done
if [ "$state" != idle ]; then
    echo "slurm start: node $NODE is '$state', not idle, after ${WAIT_S} s" >&2
    $AS_ROOT tail -n 30 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
echo "slurm start: node $NODE idle, CPUs=$CPUS RealMemory=${MEM_MB} MB"
