#!/usr/bin/env bash
# Set up (launch/setup.sh), lint with ruff and run the test suite on the CPU. Arguments go to pytest, e.g.
# `bash launch/test.sh -m slow` for the slow tests or `bash launch/test.sh tests/test_config.py`.
#   --all                 every test this machine can run: the default suite, the slow and the Slurm tests
#                         (the CUDA tests need a GPU: benchmarks/gpu_check.sh runs them)
#   TORCH_EXTENSIONS_DIR  cache of DeepSpeed's compiled CPU op (default: ~/.cache/distrain/torch_extensions)
#   DRY_RUN               1 = print the commands, run nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
if [[ "${1:-}" == "--all" ]]; then shift; set -- -m "not gpu" "$@"; fi
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/distrain/torch_extensions}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
echo "+ .venv/bin/ruff check distrain tests benchmarks"
[[ "${DRY_RUN:-0}" == 1 ]] || .venv/bin/ruff check distrain tests benchmarks
echo "+ .venv/bin/python -m pytest $*"
[[ "${DRY_RUN:-0}" == 1 ]] || exec .venv/bin/python -m pytest "$@"
