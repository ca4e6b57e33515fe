#!/usr/bin/env bash
# Stop the Ray nodes launch/ray-up.sh started (by their pid files; nothing else is touched).
#   RAY_NODE_IP    stop only the node on this address (default: every node in RAY_STATE_DIR)
#   RAY_STATE_DIR  where ray-up.sh wrote its pid files (default: ${TMPDIR:-/tmp}/distrain-ray-$USER)
#   DRY_RUN        1 = print what would be stopped
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
STATE=${RAY_STATE_DIR:-${TMPDIR:-/tmp}/distrain-ray-${USER:-$(id -un)}}
shopt -s nullglob
files=("$STATE"/*.pid)
[[ -n "${RAY_NODE_IP:-}" ]] && files=("$STATE/$RAY_NODE_IP.pid")
[[ ${#files[@]} -eq 0 ]] && { echo "ray-down.sh: no node started by ray-up.sh in $STATE"; exit 0; }
# workers before the head: reverse order of the addresses
for ((i=${#files[@]}-1; i>=0; i--)); do
  f=${files[$i]}; [[ -f "$f" ]] || { echo "ray-down.sh: no pid file $f" >&2; continue; }
  pid=$(cat "$f")
  echo "+ kill -TERM $pid   ($(basename "$f" .pid))"
  [[ "${DRY_RUN:-0}" == 1 ]] && continue
  kill -TERM "$pid" 2>/dev/null || true  # `ray start --block` stops its node's processes on TERM
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then  # ray-up.sh started the node in a process group of its own
    echo "ray-down.sh: node pid $pid still running after 60 s; killing its process group" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
done
