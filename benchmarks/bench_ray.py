"""2 Ray Train workers (`distrain launch local --workers 2`) against 2 processes under torchrun on the
same CPU job: steady-state throughput ratio and launch-to-first-step time.

    python benchmarks/bench_ray.py [--sizes tiny,large] [--repeats 3]

Run it where `distrain data prepare` wrote `data/`. The two launchers alternate in fresh
subprocesses (Ray starts and stops its own local cluster each time, on 127.0.0.2). Steady state:
median over the run's per-step records after --warmup steps of the elapsed_s increments.
Launch-to-first-step: from starting the command to the moment the first step ended (the wall clock
when metrics.jsonl's first record appeared, which is logged right after step 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": (["model.preset=tiny", "data.seq_len=128", "train.micro_batch_size=8"], 200),
    "large": (["model.preset=mini", "model.n_layer=6", "data.seq_len=256", "train.micro_batch_size=8"], 40),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(launcher: str, size: str, warmup: int) -> tuple[float, float]:
    overrides, steps = SIZES[size]
    with tempfile.TemporaryDirectory(prefix="br-", dir="/tmp") as d:
        run_dir = Path(d) / "run"
        args = [
            str(REPO / "configs" / "gpt-cpu-tiny.yaml"),
            *overrides,
            f"train.steps={steps}",
            "train.log_every=1",
            "train.eval_every=0",
            "data.eval_path=null",
            "checkpoint.at_end=false",
            f"run.dir={run_dir}",
            "tracking.progress_bar=false",
            "run.log_level=WARNING",
            "cluster.workers=2",
        ]
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr"]
            cmd += ["127.0.0.1", "--master_port", str(_port()), "-m", "distrain.cli", "train", *args]
        else:
            cmd = [sys.executable, "-m", "distrain.cli", "launch", "local", *args]
        from distrain.cluster.ray import loopback_env

        env = {**os.environ, **loopback_env("127.0.0.2"), "RAY_TMPDIR": d, "TMPDIR": d}
        metrics = run_dir / "metrics.jsonl"
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = None
        while proc.poll() is None:
            if first is None and metrics.exists() and metrics.stat().st_size > 0:
                first = time.perf_counter() - t0
            time.sleep(0.01)
        if proc.returncode != 0:
            raise RuntimeError(f"{launcher} failed:\n{proc.stderr.read()[-3000:]}")
        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["step"] > warmup]
    per_step = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(recs, recs[1:], strict=False)]
    return statistics.median(per_step), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,large")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    for size in args.sizes.split(","):
        res: dict[str, list[tuple[float, float]]] = {"torchrun": [], "ray": []}
        for _ in range(args.repeats):
            for launcher in ("torchrun", "ray"):
                res[launcher].append(one_run(launcher, size, args.warmup))
        step = {k: statistics.median(s for s, _ in v) for k, v in res.items()}
        first = {k: statistics.median(f for _, f in v) for k, v in res.items()}
        print(
            json.dumps(
                {
                    "size": size,
                    "step_ms_torchrun": round(step["torchrun"] * 1e3, 2),
                    "step_ms_ray": round(step["ray"] * 1e3, 2),
                    "throughput_ratio_ray_vs_torchrun": round(step["torchrun"] / step["ray"], 4),
                    "launch_to_first_step_s_torchrun": round(first["torchrun"], 2),
                    "launch_to_first_step_s_ray": round(first["ray"], 2),
                    "runs": {k: [[round(s * 1e3, 2), round(f, 2)] for s, f in v] for k, v in res.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
