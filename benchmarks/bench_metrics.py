"""Cost of the accounting (step-time split, FLOPs/MFU, energy reads and their all-reduce): the same
`distrain train` run with `metrics.accounting=true` and `false`, one CPU process each.

    python benchmarks/bench_metrics.py [--sizes tiny,large] [--repeats 5] [--steps 200] [--warmup 20]

The two settings alternate (on, off, on, off, ...) in fresh subprocesses; each run's steady-state
step time is the median over its records after --warmup steps of (elapsed_s difference / steps), and
the reported ratio is median(off) / median(on) of those, i.e. throughput with accounting relative to
without. Run it where `distrain data prepare` wrote `data/`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": ["model.preset=tiny", "data.seq_len=128", "train.micro_batch_size=8"],
    "large": ["model.preset=mini", "model.n_layer=6", "data.seq_len=256", "train.micro_batch_size=8"],
}


def step_time(size: str, accounting: bool, steps: int, warmup: int, log_every: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable,
            "-m",
            "distrain.cli",
            "train",
            str(REPO / "configs" / "gpt-cpu-tiny.yaml"),
            *SIZES[size],
            f"train.steps={steps}",
            f"train.log_every={log_every}",
            "train.eval_every=0",
            "data.eval_path=null",
            "checkpoint.at_end=false",
            f"run.dir={d}/run",
            "tracking.progress_bar=false",
            "run.log_level=WARNING",
            f"metrics.accounting={str(accounting).lower()}",
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        recs = [json.loads(x) for x in Path(d, "run", "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["step"] > warmup]
    per_step = [
        (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
        for a, b in zip(recs, recs[1:], strict=False)
    ]
    return statistics.median(per_step)


def direct_cost_us(log_every: int, steps: int = 20000) -> float:
    """Microseconds per step the Meters calls themselves take (mark, three laps, step_done, and a
    record every ``log_every`` steps with its energy read), in this process, world size 1."""
    import time

    import torch

    from distrain.config import load_config
    from distrain.metrics import Meters
    from distrain.parallel import DistInfo, HostComm

    cfg = load_config(REPO / "configs" / "gpt-cpu-tiny.yaml")
    info = DistInfo(
        rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo", comm=HostComm()
    )
    m = Meters(cfg, info, per_step_samples=8, tokens_per_sample=128, flops_per_sample=1e9)
    m.start([{"rank": 0, "host": "this", "gpu": None}])
    t0 = time.perf_counter()
    for i in range(steps):
        m.mark()
        m.lap("data")
        m.lap("fwd_bwd")
        m.lap("optim")
        m.step_done()
        if (i + 1) % log_every == 0:
            m.record()
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,large")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()
    for size in args.sizes.split(","):
        steps = args.steps if size == "tiny" else max(60, args.steps // 4)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for acc in (True, False):
                times[acc].append(step_time(size, acc, steps, args.warmup, args.log_every))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        direct = direct_cost_us(args.log_every)
        print(
            json.dumps(
                {
                    "size": size,
                    "steps": steps,
                    "log_every": args.log_every,
                    "step_ms_accounting_on": round(on * 1e3, 3),
                    "step_ms_accounting_off": round(off * 1e3, 3),
                    "throughput_ratio_on_vs_off": round(off / on, 4),
                    "direct_cost_us_per_step": round(direct, 2),
                    "direct_cost_pct_of_step": round(100 * direct * 1e-6 / off, 3),
                    "runs_on_ms": [round(t * 1e3, 3) for t in times[True]],
                    "runs_off_ms": [round(t * 1e3, 3) for t in times[False]],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
