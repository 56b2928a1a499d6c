#!/usr/bin/env bash
# Stop the test SLURM cluster started by start_cluster.sh and delete its folder.
# Cancels all jobs first (so no slurmstepd/job processes outlive slurmd), then stops
# slurmd, slurmctld and munged by the pids in their pid files (never by name).
# Safe to run when nothing is running. Exit 0 unless a daemon refused to die.
#   SSL_XCIT_SLURM_DIR       folder used by start_cluster.sh  [/tmp/ssl-xcit-slurm]
#   SSL_XCIT_SLURM_KEEP=1    stop the daemons but keep the folder (logs) for debugging
set -uo pipefail

DIR="${SSL_XCIT_SLURM_DIR:-/tmp/ssl-xcit-slurm}"
CONF="$DIR/slurm.conf"
export PATH="$PATH:/usr/sbin:/sbin"
rc=0

log() { echo "stop_cluster.sh: $*" >&2; }

pid_of() { # pid_of <pidfile>: the pid, if alive and really the daemon named like the file
    local pid name
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)"; name="$(basename "$1" .pid)"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

stop() { # stop <pidfile>...: SIGTERM them all, wait up to 10 s, then SIGKILL
    local pf pid pids=()
    for pf in "$@"; do pid="$(pid_of "$pf")" && pids+=("$pid") && kill "$pid" 2>/dev/null; done
    [ ${#pids[@]} -gt 0 ] || return 0
    for _ in $(seq 100); do
        alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || continue
        log "pid $pid ignored SIGTERM for 10 s, sending SIGKILL"
        kill -9 "$pid" 2>/dev/null; sleep 0.5
        if kill -0 "$pid" 2>/dev/null; then log "ERROR: pid $pid still alive"; rc=1; fi
    done
}

if [ ! -d "$DIR" ]; then
    log "nothing to stop ($DIR does not exist)"
    exit 0
fi

# 1. cancel every job while slurmctld/slurmd are still there to kill the job processes
if [ -f "$CONF" ] && pid_of "$DIR/slurmctld.pid" >/dev/null && command -v scancel >/dev/null 2>&1; then
    export SLURM_CONF="$CONF"
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -un | tr "\n" " ")"
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        for _ in $(seq 60); do   # KillWait=5 s + slack
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

# 2. daemons
stop "$DIR/slurmd.pid" "$DIR/slurmctld.pid"   # ~2 s each here, so in parallel
stop "$DIR/munge/munged.pid"                  # last: the others talk to it while stopping

# 3. folder (only if start_cluster.sh made it)
if [ "${SSL_XCIT_SLURM_KEEP:-0}" = 1 ]; then
    log "daemons stopped; kept $DIR"
elif [ -f "$DIR/.ssl-xcit-slurm" ]; then
    rm -rf "$DIR" && log "daemons stopped; removed $DIR"
else
    log "daemons stopped; not removing $DIR (no .ssl-xcit-slurm marker)"
fi
exit "$rc"
