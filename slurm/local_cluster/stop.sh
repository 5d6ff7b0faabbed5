#!/usr/bin/env bash
# Stop the daemons that start.sh started, by the PIDs in STATE_DIR/run, newest first.
#   slurm/local_cluster/stop.sh [STATE_DIR] [--purge]    # --purge also deletes STATE_DIR
set -euo pipefail
state=$(realpath -m "${1:-${FASTSSL_SLURM_HOME:-/tmp/fastssl-slurm}}")
for p in slurmd slurmctld slurmdbd mariadbd munged; do
  pidfile=$state/run/$p.pid
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
done
if [[ ${2:-} == --purge ]]; then
  rm -rf "$state"
fi
