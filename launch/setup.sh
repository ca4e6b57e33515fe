#!/usr/bin/env bash
# Set up a checkout: a virtual environment with distrain and its dev tools, and the tiny data sets.
#   PYTHON   interpreter for the venv (default: python3.11, else python3)
#   VENV     venv directory (default: .venv in the checkout)
#   DATA     where `distrain data prepare` writes (default: data)
#   EXTRAS   distrain's extras to install (default: dev, which brings docs; plus gpu where nvidia-smi
#            runs, for NVML energy)
#   SLURM    1 = install Debian's Slurm (slurmctld, slurmd, slurm-client) for the Slurm tests when it
#            is missing and apt-get can run (as root or with sudo); 0 = never (default: 1)
#   DRY_RUN  1 = print the commands, run nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
DATA=${DATA:-data}
gpu=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo ,gpu) || true)
EXTRAS=${EXTRAS:-dev$gpu}
run() { echo "+ $*"; [[ "${DRY_RUN:-0}" == 1 ]] || "$@"; }
[[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/python" -m pip install --quiet --upgrade pip
run "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
[[ -f "$DATA/pydoc/val.jsonl" && -d "$DATA/digits/val" ]] || run "$VENV/bin/distrain" data prepare --out "$DATA"
if [[ "${SLURM:-1}" == 1 ]] && ! command -v slurmctld >/dev/null && [[ ! -x /usr/sbin/slurmctld ]] && command -v apt-get >/dev/null; then
  if [[ $(id -u) == 0 ]]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(none); fi
  if [[ "${sudo[0]:-}" != none ]]; then
    apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    run "${apt[@]}" install -y -q slurmctld slurmd slurm-client || { run "${apt[@]}" update -q && run "${apt[@]}" install -y -q slurmctld slurmd slurm-client; }
  else
    echo "setup.sh: Slurm is not installed and apt-get needs root: the Slurm tests will be skipped (apt-get install slurmctld slurmd slurm-client)"
  fi
fi
