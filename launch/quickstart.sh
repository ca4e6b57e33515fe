#!/usr/bin/env bash
# Set up (launch/setup.sh) and train the tiny GPT on the CPU: runs/gpt-cpu-tiny/ gets config.yaml,
# metrics.jsonl, summary.json and a checkpoint.
#   CONFIG   config to train (default: configs/gpt-cpu-tiny.yaml); extra arguments are overrides
#   DRY_RUN  1 = print the commands, run nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
bash launch/setup.sh
CONFIG=${CONFIG:-configs/gpt-cpu-tiny.yaml}
echo "+ .venv/bin/distrain train $CONFIG $*"
[[ "${DRY_RUN:-0}" == 1 ]] || exec .venv/bin/distrain train "$CONFIG" "$@"
