#!/usr/bin/env bash
# Stop the Slurm daemons that .ci/slurm/start.sh started (and no others): each recorded pid is
# signalled only while /proc/<pid>/comm still names that daemon, so a reused pid is left alone.
set -uo pipefail
[ "$(id -u)" -eq 0 ] && AS_ROOT="" || AS_ROOT="sudo"
STATE="${SLURM_CI_STATE:-/tmp/snakedrp-slurm}"
alive() { local s; s="$(ps -o stat= -p "$1" 2>/dev/null)"; [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }
for name in slurmd slurmctld munged; do  # the reverse of the start order
    file="$STATE/$name.pid"
    [ -f "$file" ] || continue
    pid="$(cat "$file")"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        $AS_ROOT kill -TERM "$pid"
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && $AS_ROOT kill -KILL "$pid"
        echo "slurm stop: $name (pid $pid) stopped"
    fi
    rm -f "$file"
done
