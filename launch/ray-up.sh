#!/usr/bin/env bash
# Start one Ray node (head or worker) in the background, stopped later by launch/ray-down.sh.
# Each node runs `ray start --block` under a pid file; stopping that pid stops the node's processes.
#   RAY_ROLE           head | worker (default: head)
#   RAY_NODE_IP        address this node binds (default: 127.0.0.2; on one machine give each node
#                      its own 127.0.0.x: Ray rewrites 127.0.0.1 to the machine's external address)
#   RAY_PORT           head: GCS port (default: 6379)
#   RAY_HEAD           worker: the head's HOST:PORT (default: 127.0.0.2:$RAY_PORT)
#   RAY_NUM_CPUS       CPUs this node offers (default: Ray's count)
#   RAY_NUM_GPUS       GPUs this node offers (default: Ray's count)
#   RAY_DASHBOARD      head: 1 = dashboard and Jobs API on (needed by ray-submit.sh), 0 = off (default: 1)
#   RAY_DASHBOARD_HOST address the dashboard binds (default: 127.0.0.1; set 0.0.0.0 only on purpose)
#   RAY_DASHBOARD_PORT dashboard / Jobs API port (default: 8265)
#   RAY_STATE_DIR      pid files and node logs (default: ${TMPDIR:-/tmp}/distrain-ray-$USER)
#   RAY_BIN            the ray command (default: .venv/bin/ray, else ray on PATH)
#   DRY_RUN            1 = print the command, start nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
# Ray's token authentication: every node, driver and Jobs client uses the token in ~/.ray/auth_token
# (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); copy it to every machine of the cluster
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
cd "$(dirname "$0")/.."
ROLE=${RAY_ROLE:-head}
IP=${RAY_NODE_IP:-127.0.0.2}
PORT=${RAY_PORT:-6379}
STATE=${RAY_STATE_DIR:-${TMPDIR:-/tmp}/distrain-ray-${USER:-$(id -un)}}
RAY=${RAY_BIN:-$([[ -x .venv/bin/ray ]] && echo .venv/bin/ray || echo ray)}
args=(start --block --node-ip-address "$IP" --disable-usage-stats)
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus "$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus "$RAY_NUM_GPUS")
case "$ROLE" in
  head)
    args+=(--head --port "$PORT")
    if [[ "${RAY_DASHBOARD:-1}" == 1 ]]; then
      args+=(--include-dashboard true --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}" --dashboard-port "${RAY_DASHBOARD_PORT:-8265}")
    else
      args+=(--include-dashboard false)
    fi ;;
  worker) args+=(--address "${RAY_HEAD:-127.0.0.2:$PORT}") ;;
  *) echo "ray-up.sh: RAY_ROLE=$ROLE: use head or worker" >&2; exit 2 ;;
esac
if [[ "$IP" == 127.* ]]; then  # a loopback cluster: no cloud-metadata probes leave the machine
  export RAY_USAGE_STATS_ENABLED=0 http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
    HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost \
    GLOO_SOCKET_IFNAME=lo
fi
echo "+ $RAY ${args[*]}   (pid file $STATE/$IP.pid, log $STATE/$IP.log)"
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
mkdir -p "$STATE"
if [[ -f "$STATE/$IP.pid" ]] && kill -0 "$(cat "$STATE/$IP.pid")" 2>/dev/null; then
  echo "ray-up.sh: a node on $IP is already running (pid $(cat "$STATE/$IP.pid")); stop it with launch/ray-down.sh" >&2; exit 1
fi
[[ "$ROLE" == head && "$RAY_AUTH_MODE" == token ]] && "$RAY" get-auth-token --generate >/dev/null  # no-op if one exists
setsid nohup "$RAY" "${args[@]}" >"$STATE/$IP.log" 2>&1 &  # its own process group, for ray-down.sh
echo $! >"$STATE/$IP.pid"
for _ in $(seq 1 240); do  # up to 120 s
  if grep -q "Ray runtime started" "$STATE/$IP.log" 2>/dev/null; then echo "ray node $ROLE up on $IP (pid $(cat "$STATE/$IP.pid"))"; exit 0; fi
  if ! kill -0 "$(cat "$STATE/$IP.pid")" 2>/dev/null; then echo "ray-up.sh: ray start failed; its log:" >&2; tail -30 "$STATE/$IP.log" >&2; rm -f "$STATE/$IP.pid"; exit 1; fi
  sleep 0.5
done
echo "ray-up.sh: no 'Ray runtime started' in $STATE/$IP.log after 120 s" >&2; exit 1
