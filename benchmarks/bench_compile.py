"""Compiled steps: `distrain train` with and without `parallel.compile`, against a plain PyTorch loop
eager and compiled (`model.compile()`, inductor), one CPU process each, side by side.

    python benchmarks/bench_compile.py [--sizes large] [--repeats 2] [--steps 60] [--warmup 10]

Same model, batches, AdamW, schedule and clipping as `bench_loop.py` (whose loops this reuses). Each
loop runs in its own subprocess; the loops alternate and repeat. The step time is the median over the
steps after --warmup; the compile time is what the first --warmup steps took beyond as many steady
steps (for distrain, from the first metrics.jsonl windows), reported on its own: each loop runs with
an empty inductor cache of its own (TORCHINDUCTOR_CACHE_DIR), so it is a first run's compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loop  # noqa: E402

LOOPS = ["plain", "plain-compiled", "distrain", "distrain-compiled"]


def run_distrain(cfg) -> list[float]:
    """Per-step times from metrics.jsonl: each window's elapsed time spread over its steps."""
    from distrain.train import run

    run(cfg)
    recs = [json.loads(line) for line in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    el = [0.0] + [r["elapsed_s"] for r in recs if "loss" in r]
    every = bench_loop.LOG_EVERY
    return [(b - a) / every for a, b in zip(el, el[1:], strict=False) for _ in range(every)]


def child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_loop._cfg(args.size, args.steps, f"{tmp}/run", "fp32")
        compiled = args.loop.endswith("-compiled")
        if args.loop.startswith("distrain"):
            if compiled:
                cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"compile": True})})
            times = run_distrain(cfg)
        else:
            times = bench_loop.run_plain(cfg, bench_loop._batches(cfg, args.steps), 0, compiled)
    steady = statistics.median(times[args.warmup :])
    first = sum(times[: args.warmup]) - args.warmup * steady
    print("RESULT " + json.dumps({"loop": args.loop, "step_s": steady, "compile_s": first}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="large")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--loop", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup % bench_loop.LOG_EVERY:
        sys.exit(f"--warmup must be a multiple of {bench_loop.LOG_EVERY} (distrain's log window)")
    if args.loop:
        child(args)
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(
        "| size | loop | step ms | throughput / plain eager | throughput / plain compiled | compile s |\n"
        "|---|---|---|---|---|---|"
    )
    for size in args.sizes.split(","):
        res: dict[str, list[dict]] = {loop: [] for loop in LOOPS}
        for _ in range(args.repeats):
            for loop in LOOPS:
                cmd = [sys.executable, __file__, "--loop", loop, "--size", size]
                cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                with tempfile.TemporaryDirectory() as cache:
                    env_loop = {**env, "TORCHINDUCTOR_CACHE_DIR": cache}
                    res[loop].append(bench_loop.child_result(cmd, env_loop, f"{loop} {size}"))
        med = {k: statistics.median(r["step_s"] for r in v) for k, v in res.items()}
        comp = {k: statistics.median(r["compile_s"] for r in v) for k, v in res.items()}
        for loop in LOOPS:
            print(
                f"| {size} | {loop} | {med[loop] * 1e3:.1f} | {med['plain'] / med[loop]:.3f}x | "
                f"{med['plain-compiled'] / med[loop]:.3f}x | {comp[loop]:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
