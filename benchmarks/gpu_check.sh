#!/usr/bin/env bash
# The CUDA path on one H100/H200, in one shot: set up, run every `gpu`-marked test, then measure
# distrain against plain PyTorch loops (benchmarks/bench_gpu.py) and write the rows into
# benchmarks/RESULTS.md under the card's name (and into $OUT when that is set).
#
# The GPU machine has Python 3.12 with torch, transformers, pyarrow, rich, safetensors, scikit-learn,
# pytest and nvidia-ml-py, and no network. What is missing travels as wheels in .whl/: fetch them
# here first with `bash benchmarks/gpu_wheels.sh`. distrain installs with --no-deps over that torch;
# W&B is disabled and Ray is not needed.
#   PY                 python on the GPU machine (default: python3)
#   WHEELS             the wheels directory (default: .whl)
#   GPU_CHECK_DRY_RUN  1 = on a CPU machine: the same steps with the project's venv (no install),
#                      the gpu tests collected only, the benchmark on tiny shapes, results in a temp copy
#   RESULTS            the markdown file the rows go to (default: benchmarks/RESULTS.md; dry run: a temp copy)
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY_RUN:-0}
WHEELS=${WHEELS:-.whl}
SCRATCH=$(mktemp -d /tmp/distrain-gpu-check.XXXXXX)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/distrain/torch_extensions}
t0=$SECONDS
step() { echo; echo "== $* ($((SECONDS - t0)) s)"; }

if [[ $DRY == 1 ]]; then
  PY=${PY:-.venv/bin/python}
  RESULTS=${RESULTS:-$SCRATCH/RESULTS.md}
  [[ -f "$RESULTS" ]] || cp benchmarks/RESULTS.md "$RESULTS"
  export DS_ACCELERATOR=cpu
  step "set-up (dry run: the project's venv, nothing installed)"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 && echo "wheels: $(ls "$WHEELS"/*.whl | wc -l) in $WHEELS" || echo "wheels: none in $WHEELS (fetch with benchmarks/gpu_wheels.sh)"
  TESTS=(--collect-only -q)
  BENCH=(--dry-run)
else
  PY=${PY:-python3}
  RESULTS=${RESULTS:-benchmarks/RESULTS.md}
  export DS_ACCELERATOR=cuda
  step "set-up: wheels from $WHEELS and distrain (--no-deps) into $SCRATCH/site"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run benchmarks/gpu_wheels.sh on a machine with pip access" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" "$WHEELS"/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SCRATCH/site" .
  export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, deepspeed, distrain; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '|', torch.cuda.get_device_name())"
  TESTS=(-q --timeout 300)
  BENCH=()
fi

step "gpu tests: pytest -m gpu"
tests_rc=0  # one shot: a failing test is reported, and the benchmark still runs
"$PY" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py "${TESTS[@]}" || tests_rc=$?

step "benchmark: benchmarks/bench_gpu.py"
"$PY" benchmarks/bench_gpu.py --results "$RESULTS" --scratch "$SCRATCH" "${BENCH[@]}"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp "$RESULTS" "$OUT/RESULTS.md"; fi
step "done: rows in $RESULTS; gpu tests exit code $tests_rc"
rm -rf "$SCRATCH/site"
exit "$tests_rc"
