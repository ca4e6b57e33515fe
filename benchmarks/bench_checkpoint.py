"""Checkpoint cost: how long training blocks for a synchronous save and for an async one
(checkpoint.async), and save/load time against a plain torch.save/torch.load of the same tensors
(the module's state dict and the optimizer's), in one process on one engine.

    python benchmarks/bench_checkpoint.py [--preset small] [--repeats 3]

Run where `distrain data prepare` wrote data/. distrain's save includes what torch.save does not:
the manifest (sha256 of every file), fsync, the atomic rename and `latest`, per-rank data and RNG
state; its load verifies every hash before DeepSpeed reads the shards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from distrain.checkpoint import _Writer, resume_plan
    from distrain.config import load_config
    from distrain.data import DataPipeline
    from distrain.train import run, setup

    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        cfg = load_config(
            REPO / "configs" / "gpt-cpu-tiny.yaml",
            [
                f"model.preset={args.preset}",
                "train.steps=1",
                "train.eval_every=0",
                "checkpoint.at_end=false",
                f"run.dir={tmp}/run",
                "run.log_level=WARNING",
                "tracking.progress_bar=false",
                "train.micro_batch_size=2",
            ],
        )
        s = setup(cfg)
        run(cfg, s)  # one step: the optimizer has its states
        ck = s.trainer.checkpointer
        n_params = sum(p.numel() for p in s.engine.module.parameters())
        rows: dict[str, list[float]] = {
            k: [] for k in ("sync", "async_block", "async_total", "torch_save", "load", "torch_load")
        }
        for r in range(args.repeats):
            for mode in ("sync", "async"):
                ck.writer = _Writer(background=mode == "async")
                t0 = time.perf_counter()
                ck.save(10 + 2 * r + (mode == "async"))
                blocked = time.perf_counter() - t0
                ck.writer.wait()
                total = time.perf_counter() - t0
                ck.writer.close()
                if mode == "sync":
                    rows["sync"].append(blocked)
                else:
                    rows["async_block"].append(blocked)
                    rows["async_total"].append(total)
            path = Path(tmp) / f"plain-{r}.pt"
            t0 = time.perf_counter()
            torch.save(
                {"module": s.engine.module.state_dict(), "optimizer": s.engine.optimizer.state_dict()}, path
            )
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            rows["torch_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(path, map_location="cpu", weights_only=True)
            rows["torch_load"].append(time.perf_counter() - t0)
            # a fresh pipeline (one that has drawn no batch) takes the restored position (not timed)
            ck.rank_parts["data"] = DataPipeline(cfg)
            t0 = time.perf_counter()
            ck.load(resume_plan(ck.root, ck.comm))  # the plan verifies the newest checkpoint's hashes
            rows["load"].append(time.perf_counter() - t0)
            path.unlink()
        med = {k: statistics.median(v) for k, v in rows.items()}
        size = (
            sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints" / "step00000010").iterdir())
            / 2**20
        )
    print(
        f"model: gpt preset {args.preset}, {n_params / 1e6:.1f}M parameters, checkpoint {size:.0f} MiB (fp32 weights + AdamW states); median of {args.repeats}\n"
    )
    print("| measure | seconds | ratio |")
    print("|---|---|---|")
    print(f"| sync save (training blocked) | {med['sync']:.2f} | 1.00 (baseline for async) |")
    print(
        f"| async save: training blocked | {med['async_block']:.2f} | {med['async_block'] / med['sync']:.3f} of a sync save |"
    )
    print(
        f"| async save: until written and verified | {med['async_total']:.2f} | {med['async_total'] / med['sync']:.2f} of a sync save |"
    )
    print(
        f"| plain torch.save + fsync of the same tensors | {med['torch_save']:.2f} | sync save / torch.save = {med['sync'] / med['torch_save']:.2f}x |"
    )
    print(
        f"| load (verify hashes + DeepSpeed load + state) | {med['load']:.2f} | load / torch.load = {med['load'] / med['torch_load']:.2f}x |"
    )
    print(f"| plain torch.load (weights_only) | {med['torch_load']:.2f} | |")


if __name__ == "__main__":
    main()
