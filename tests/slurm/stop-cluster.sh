#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by tests/slurm/start-cluster.sh.
#
#   tests/slurm/stop-cluster.sh [DIR]   (DIR defaults to $LAYERLAB_SLURM_DIR, then
#                                        /tmp/layerlab-slurm)
#
# First cancels the jobs still queued or running (so no job processes are left
# behind; set LAYERLAB_SLURM_KEEP_JOBS=1 to skip), then stops slurmd, slurmctld,
# slurmdbd, mariadbd and munged with SIGTERM, each by the pid in its pid file under
# DIR/run (never by name), and waits for each to exit (bounded; SIGKILL after the
# bound). Exits 0 when everything is stopped, also when nothing was running.
# The state folder is kept, so start-cluster.sh restarts with the same state.
set -uo pipefail

DIR="${1:-${LAYERLAB_SLURM_DIR:-/tmp/layerlab-slurm}}"
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
RUN="$DIR/run"
export SLURM_CONF="$DIR/etc/slurm.conf"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "stop-cluster: $*"; }

# live_pid PIDFILE COMM: print the pid if PIDFILE names a live process named COMM.
live_pid() {
    local pid comm
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1" 2>/dev/null)
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [ "$comm" = "$2" ] || return 1
    echo "$pid"
}

stopped_any=0
failed=0

# stop_group TIMEOUT NAME:PIDFILE:COMM...: SIGTERM each live daemon of the group, then
# wait (bounded) until all have exited; SIGKILL what is left after TIMEOUT seconds.
stop_group() {
    local timeout=$1 spec name pidfile comm pid deadline alive
    shift
    local pids=() names=() files=()
    for spec in "$@"; do
        IFS=: read -r name pidfile comm <<<"$spec"
        if pid=$(live_pid "$pidfile" "$comm"); then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name"); files+=("$pidfile")
            stopped_any=1
        elif [ -e "$pidfile" ] || [ -L "$pidfile" ]; then
            rm -f "$pidfile"   # stale
        fi
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    deadline=$(( $(date +%s) + timeout ))
    while :; do
        alive=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        [ "$alive" -eq 1 ] || break
        if [ "$(date +%s)" -ge "$deadline" ]; then
            local i
            for i in "${!pids[@]}"; do
                if kill -0 "${pids[$i]}" 2>/dev/null; then
                    say "${names[$i]} (pid ${pids[$i]}) still running after ${timeout}s; sending SIGKILL"
                    kill -KILL "${pids[$i]}" 2>/dev/null || true
                fi
            done
            sleep 1
            for i in "${!pids[@]}"; do
                if kill -0 "${pids[$i]}" 2>/dev/null; then
                    say "ERROR: ${names[$i]} (pid ${pids[$i]}) survived SIGKILL"
                    failed=1
                fi
            done
            break
        fi
        sleep 0.2
    done
    rm -f "${files[@]}"
}

# Cancel leftover jobs while the controller is still up.
if [ "${LAYERLAB_SLURM_KEEP_JOBS:-0}" != 1 ] && [ -f "$SLURM_CONF" ] &&
   live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null &&
   live_pid "$RUN/slurmd.pid" slurmd >/dev/null; then
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        deadline=$(( $(date +%s) + 20 ))
        while [ -n "$(squeue -h -o '%A' 2>/dev/null)" ] && [ "$(date +%s)" -lt "$deadline" ]; do
            sleep 0.5
        done
        left=$(squeue -h -o '%A %T' 2>/dev/null | tr '\n' ' ')
        [ -z "$left" ] || say "warning: jobs still listed after 20s: $left"
    fi
fi

# Order matters: slurmd, then slurmctld (it flushes job records to slurmdbd), then
# slurmdbd; MariaDB and munged are independent of each other after that.
stop_group 30 "slurmd:$RUN/slurmd.pid:slurmd"
stop_group 30 "slurmctld:$RUN/slurmctld.pid:slurmctld"
stop_group 30 "slurmdbd:$RUN/slurmdbd.pid:slurmdbd"
stop_group 60 "mariadbd:$RUN/mariadb.pid:mariadbd" "munged:$RUN/munged.pid:munged"

if [ "$failed" -ne 0 ]; then
    say "some daemons could not be stopped"
    exit 1
fi
if [ "$stopped_any" -eq 0 ]; then
    say "nothing was running (folder $DIR)"
else
    say "stopped (state kept in $DIR)"
fi
exit 0
