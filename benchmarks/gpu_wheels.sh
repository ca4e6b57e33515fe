#!/usr/bin/env bash
# Fetch what benchmarks/gpu_check.sh needs on a GPU machine that has Python 3.12, torch, transformers,
# pyarrow, rich, safetensors, scikit-learn, pytest and nvidia-ml-py but no network: wheels for
# DeepSpeed (built here from its source release: pure Python, its ops compile on first use) and
# pydantic, into .whl/ (ignored by git; a few MiB). Run it here, in the repository root, then carry
# .whl to the GPU machine with the checkout.
#   WHEELS  output directory (default: .whl)
#   PY      python with pip and torch installed, to build DeepSpeed's wheel (default: .venv/bin/python)
#   DRY_RUN 1 = print the commands, run nothing
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PY:-.venv/bin/python}
run() { echo "+ $*"; [[ "${DRY_RUN:-0}" == 1 ]] || "$@"; }
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
run mkdir -p "$WHEELS"
# binary wheels for the GPU machine's interpreter (CPython 3.12, x86-64 Linux)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PKGS=()
for name in pydantic pydantic-core annotated-types typing-inspection hjson; do
  PKGS+=("$name==$(version "$name")")
done
run "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WHEELS" "${PKGS[@]}"
# DeepSpeed publishes a source release only: build its pure-Python wheel (DS_BUILD_OPS=0: no op is
# compiled now; ZeRO-Offload's CPU Adam is built on the GPU machine the first time it is used)
if ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
  run env DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" \
    "deepspeed==$(version deepspeed)"
fi
[[ "${DRY_RUN:-0}" == 1 ]] || { ls -la "$WHEELS"; du -sh "$WHEELS"; }
