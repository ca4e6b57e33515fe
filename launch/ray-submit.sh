#!/usr/bin/env bash
# Submit a distrain run to a running Ray cluster through the Ray Jobs API and follow its logs.
# The job runs `distrain launch ray CONFIG OVERRIDES...` on the cluster, with this repository as its
# working directory (uploaded without .venv/, .git/, runs/ and EXCLUDES) and the runtime env below.
# Relative data paths in the config resolve inside that upload; the run directory is absolute.
#   CONFIG          config to run (default: configs/gpt-cpu-tiny.yaml); arguments are overrides
#   RUN_DIR         run directory, on storage every node shares (default: $PWD/runs/<config name>)
#   EXCLUDES        more paths not to upload, comma-separated (e.g. big local data)
#   RAY_JOBS        Jobs API address (default: http://127.0.0.1:8265, the head's dashboard)
#   RAY_ADDRESS     cluster address the job's driver joins (default: auto, the cluster it runs on)
#   WORKERS         workers (default: cluster.workers from the config)
#   PYTHON          python on the cluster nodes (default: this repository's .venv/bin/python)
#   NO_WAIT         1 = submit and return (follow with `ray job logs -f ID`)
#   DRY_RUN         1 = print the command, submit nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
# Ray's token authentication: every node, driver and Jobs client uses the token in ~/.ray/auth_token
# (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); copy it to every machine of the cluster
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/gpt-cpu-tiny.yaml}
RAY=$([[ -x .venv/bin/ray ]] && echo .venv/bin/ray || echo ray)
PY=${PYTHON:-$PWD/.venv/bin/python}
RUN_DIR=${RUN_DIR:-$PWD/runs/$(basename "$CONFIG" .yaml)}
excludes='".venv", ".git", "runs"'
IFS=',' read -ra extra <<<"${EXCLUDES:-}"
for e in "${extra[@]}"; do excludes+=", \"$e\""; done
env_json=$(printf '{"working_dir": ".", "excludes": [%s], "env_vars": {"RAY_ADDRESS": "%s"}}' "$excludes" "${RAY_ADDRESS:-auto}")
cmd=("$PY" -m distrain.cli launch ray "$CONFIG" "run.dir=$RUN_DIR" "$@")
[[ -n "${WORKERS:-}" ]] && cmd+=(--workers "$WORKERS")
args=(job submit --address "${RAY_JOBS:-http://127.0.0.1:8265}" --runtime-env-json "$env_json")
[[ "${NO_WAIT:-0}" == 1 ]] && args+=(--no-wait)
echo "+ $RAY ${args[*]} -- ${cmd[*]}"
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost
exec "$RAY" "${args[@]}" -- "${cmd[@]}"
