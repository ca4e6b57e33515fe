#!/usr/bin/env bash
# Set up a checkout: a virtual environment with distrain and its dev tools, and the tiny data sets.
#   PYTHON   interpreter for the venv (default: python3.11, else python3)
#   VENV     venv directory (default: .venv in the checkout)
#   DATA     where `distrain data prepare` writes (default: data)
#   DRY_RUN  1 = print the commands, run nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
DATA=${DATA:-data}
run() { echo "+ $*"; [[ "${DRY_RUN:-0}" == 1 ]] || "$@"; }
[[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/python" -m pip install --quiet --upgrade pip
run "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
[[ -f "$DATA/pydoc/val.jsonl" && -d "$DATA/digits/val" ]] || run "$VENV/bin/distrain" data prepare --out "$DATA"
