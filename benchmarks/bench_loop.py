"""Step throughput and peak memory of `distrain train` against a plain PyTorch loop and a minimal
hand-written DeepSpeed loop: same model, data, optimizer (AdamW), schedule, clipping and precision,
one CPU process each.

    python benchmarks/bench_loop.py [--sizes tiny,large] [--repeats 3] [--steps 60] [--warmup 10]
    python benchmarks/bench_loop.py --models gan,vae [--sizes tiny,large] ...
    python benchmarks/bench_loop.py --parallel sp [--sizes 512,2048] [--steps 20] [--warmup 5]

With ``--models gan,vae`` the generative models run against a plain PyTorch loop of the same step:
the GAN's two AdamW optimizers stepping in turn (discriminator, then generator, the other part
frozen), the VAE's one (no hand-written DeepSpeed loop for them).

With ``--parallel sp`` a Llama trains on 2 ranks (torchrun, gloo) two ways on the same tokens a
step: sequence parallelism (sp 2: each rank holds half of every sequence of a micro-batch of M)
against data parallelism (dp 2: each rank holds whole sequences, micro-batches of M / 2); step
time and the largest rank's peak RSS.

Each loop runs in its own subprocess (so each peak RSS is its own); the loops alternate and repeat,
and the median steady-state step time (after --warmup steps) is reported. The baselines iterate
batches prepared in memory beforehand; distrain reads them through its own data pipeline in the
training process, so its figure includes tokenizing and packing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOG_EVERY = 5  # distrain's step time is read from metrics.jsonl: elapsed_s over each window of 5 steps
SIZES = {
    # tiny: the shipped tiny config; large: a step of >= 100 ms on 2 CPU cores
    "tiny": ["model.preset=tiny", "data.seq_len=128", "train.micro_batch_size=8"],
    "large": ["model.preset=mini", "model.n_layer=6", "data.seq_len=256", "train.micro_batch_size=8"],
}


SP_SIZES = {
    # seq_len: a 4-layer Llama of width 256 (8 heads), micro-batch of M sequences under sp 2
    "512": ["model.preset=mini", "data.seq_len=512", "train.micro_batch_size=4"],
    "2048": ["model.preset=mini", "data.seq_len=2048", "train.micro_batch_size=2"],
}


GENERATIVE_SIZES = {
    # tiny: the shipped tiny configs (32 x 32 digits); large: 64 x 64, 4x the feature maps
    "tiny": [],
    "large": ["model.image_size=64", "model.width=64", "train.micro_batch_size=32"],
}


def _cfg(size: str, steps: int, run_dir: str, precision: str, model: str = "gpt"):
    from distrain.config import load_config

    config, sizes = (
        (REPO / "configs" / "gpt-cpu-tiny.yaml", SIZES)
        if model == "gpt"
        else (REPO / "configs" / f"{model}-cpu-tiny.yaml", GENERATIVE_SIZES)
    )
    return load_config(
        config,
        [
            *sizes[size],
            f"train.steps={steps}",
            f"train.log_every={LOG_EVERY}",
            "train.eval_every=0",
            "data.eval_path=null",
            "checkpoint.at_end=false",
            f"run.dir={run_dir}",
            f"parallel.precision={precision}",
            "tracking.progress_bar=false",
            "run.log_level=WARNING",
        ],
    )


def _batches(cfg, n: int):
    from distrain.data import DataPipeline

    it = DataPipeline(cfg).train_batches()
    return [next(it) for _ in range(n)]


def _lr_lambda(cfg):
    """The same schedule distrain's ds_config gives (warmup from lr/(W+1), cosine to the floor)."""
    import math

    o, steps = cfg.optim, cfg.train.steps
    w = max(o.warmup_steps, 1)
    start = 1.0 / (o.warmup_steps + 1) if o.warmup_steps else 1.0
    w = max(w, 2)

    def f(t: int) -> float:
        if t < w:
            return start + (1 - start) * t / w
        if o.schedule == "constant":
            return 1.0
        done = min((t - w + 1) / max(1, steps - w), 1.0)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    return f


def run_plain(cfg, batches, warmup: int, compiled: bool = False) -> list[float]:
    """The plain loop's step times after ``warmup`` steps; ``compiled``: ``model.compile()`` (inductor)."""
    import torch

    from distrain.models import build_model, get_spec
    from distrain.parallel.engine import param_groups

    model = build_model(cfg)
    if compiled:
        model.compile(backend="inductor")
    if cfg.parallel.precision == "bf16":
        model = model.to(
            torch.bfloat16
        )  # bf16 compute; master weights are not kept (cheaper than DeepSpeed's)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    loss_fn = get_spec(cfg.model.name).loss
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss = loss_fn(model, b)
        loss.backward()
        if cfg.parallel.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.parallel.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_plain_parts(cfg, batches, warmup: int) -> list[float]:
    """The plain loop of a model of several parts (or with a state): one AdamW and LambdaLR per part
    (the part's optim.<part> settings), the model's updates in turn, the other parts frozen, each
    part's gradients clipped at its grad_clip."""
    import torch

    from distrain.models import build_parts, get_spec
    from distrain.parallel.engine import param_groups

    spec = get_spec(cfg.model.name)
    parts = build_parts(cfg)
    opts, scheds, clips = {}, {}, {}
    for k, m in parts.items():
        pc = cfg.for_part(k)
        o = pc.optim
        opts[k] = torch.optim.AdamW(param_groups(m, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        scheds[k] = torch.optim.lr_scheduler.LambdaLR(opts[k], _lr_lambda(pc))
        clips[k] = pc.parallel.grad_clip
    updates = spec.steps(cfg)
    state = spec.state(cfg) if spec.state else None
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        for u in updates:
            for k, m in parts.items():
                m.requires_grad_(k == u.part)
            loss = u.loss(parts, b, state)
            loss.backward()
            if clips[u.part] > 0:
                torch.nn.utils.clip_grad_norm_(parts[u.part].parameters(), clips[u.part])
            opts[u.part].step()
            scheds[u.part].step()
            opts[u.part].zero_grad(set_to_none=True)
            float(loss)
        if state is not None:
            state.after_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_deepspeed(cfg, batches, warmup: int) -> list[float]:
    """A minimal loop as a DeepSpeed user writes it, with a hand-written ds_config."""
    import deepspeed

    from distrain.models import build_model, get_spec
    from distrain.parallel.engine import param_groups

    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + os.getpid() % 1000),
    )
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    o = cfg.optim
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.parallel.grad_clip,
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.train.steps,
                "warmup_num_steps": max(o.warmup_steps, 1),
                "warmup_min_ratio": 1 / (o.warmup_steps + 1),
                "cos_min_ratio": o.min_lr_ratio,
            },
        },
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        **({"bf16": {"enabled": True}} if cfg.parallel.precision == "bf16" else {}),
    }
    model = build_model(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, o.weight_decay), config=ds_config
    )
    loss_fn = get_spec(cfg.model.name).loss
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss = loss_fn(engine, b)
        engine.backward(loss)
        engine.step()
        float(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_distrain(cfg, warmup: int) -> list[float]:
    from distrain.train import run

    run(cfg)
    recs = [json.loads(line) for line in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    el = [r["elapsed_s"] for r in recs if "world_size" in r]  # the training records
    first = -(-warmup // LOG_EVERY)  # first window that starts after the warmup steps
    return [(b - a) / LOG_EVERY for a, b in zip(el[first - 1 : -1], el[first:], strict=True)]


def child_split(args) -> None:
    """One rank of a 2-rank sp or dp run (``--parallel sp``), in the run directory the parent made."""
    from distrain.config import load_config

    over = SP_SIZES[args.size]
    micro = int(over[-1].split("=")[1])
    split = (
        ["parallel.sequence_parallel=2"] if args.loop == "sp" else [f"train.micro_batch_size={micro // 2}"]
    )
    cfg = load_config(
        REPO / "configs" / "llama-cpu-tiny.yaml",
        [
            *over,
            *split,
            "model.max_seq_len=2048",
            f"train.steps={args.steps}",
            f"train.log_every={LOG_EVERY}",
            "train.eval_every=0",
            "checkpoint.at_end=false",
            "tracking.wandb.mode=disabled",
            f"parallel.precision={args.precision}",
            "parallel.zero_stage=1",
            f"run.dir={args.run_dir}",
            "cluster.workers=2",
        ],
    )
    times = run_distrain(cfg, args.warmup)  # every rank trains; rank 0's records are the job's
    if int(os.environ["RANK"]) != 0:
        times = None
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT " + json.dumps({"step_s": times and statistics.median(times), "peak_rss_mib": rss_mib}),
        flush=True,
    )


def split_rows(args, env: dict) -> None:
    """``--parallel sp``: 2 ranks at sp 2 against 2 ranks at dp 2 on the same tokens a step."""
    rows = []
    for size in args.sizes.split(","):
        res: dict[str, list[dict]] = {"dp": [], "sp": []}
        for _ in range(args.repeats):
            for loop in res:
                with tempfile.TemporaryDirectory() as tmp:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
                    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)]
                    cmd += [__file__, "--loop", loop, "--size", size, "--steps", str(args.steps)]
                    cmd += [
                        "--warmup",
                        str(args.warmup),
                        "--precision",
                        args.precision,
                        "--run-dir",
                        f"{tmp}/run",
                    ]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.getcwd())
                lines = [json.loads(ln[7:]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or len(lines) != 2:
                    sys.exit(f"{loop} {size} failed:\n{out.stderr[-3000:]}")
                res[loop].append(
                    {
                        "step_s": next(r["step_s"] for r in lines if r["step_s"]),
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in lines),
                    }
                )
        med = {k: statistics.median(r["step_s"] for r in v) for k, v in res.items()}
        rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in res.items()}
        rows.append((size, med, rss))
    print(
        f"| seq_len ({args.precision}) | dp 2 step ms | sp 2 step ms | sp / dp (throughput) | peak RSS MiB a rank, dp / sp |"
    )
    print("|---|---|---|---|---|")
    for size, med, rss in rows:
        print(
            f"| {size} | {med['dp'] * 1e3:.1f} | {med['sp'] * 1e3:.1f} | {med['dp'] / med['sp']:.3f}x | "
            f"{rss['dp']:.0f} / {rss['sp']:.0f} |"
        )


def child(args) -> None:
    if args.loop in ("sp", "dp"):
        return child_split(args)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args.size, args.steps, f"{tmp}/run", args.precision, args.model)
        if args.loop == "distrain":
            times = run_distrain(cfg, args.warmup)
        else:
            batches = _batches(cfg, args.steps)
            plain = run_plain if args.model == "gpt" else run_plain_parts
            times = (plain if args.loop == "plain" else run_deepspeed)(cfg, batches, args.warmup)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps({"loop": args.loop, "step_s": statistics.median(times), "peak_rss_mib": rss_mib}),
        flush=True,
    )


def child_result(cmd: list[str], env: dict, what: str) -> dict:
    """Run one loop's subprocess; its RESULT line, or exit naming ``what`` with the child's stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.getcwd())
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,large")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--models", default="gpt", help="gpt, or generative models: gan,vae")
    ap.add_argument("--model", default="gpt", help=argparse.SUPPRESS)
    ap.add_argument("--loop", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", help="sp: 2 ranks at sequence_parallel 2 against 2 at dp 2")
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop:
        child(args)
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.models != "gpt":
        return generative(args, env)
    if args.parallel == "sp":
        if args.sizes == "tiny,large":
            args.sizes = ",".join(SP_SIZES)
        return split_rows(args, env)
    rows = []
    for size in args.sizes.split(","):
        res: dict[str, list[dict]] = {"plain": [], "deepspeed": [], "distrain": []}
        for _ in range(args.repeats):
            for loop in res:
                cmd = [
                    sys.executable,
                    __file__,
                    "--loop",
                    loop,
                    "--size",
                    size,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--precision",
                    args.precision,
                ]
                res[loop].append(child_result(cmd, env, f"{loop} {size}"))
        med = {k: statistics.median(r["step_s"] for r in v) for k, v in res.items()}
        rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in res.items()}
        rows.append((size, med, rss))
    print(
        f"| size ({args.precision}) | plain step ms | DeepSpeed step ms | distrain step ms | distrain / DeepSpeed (throughput) | distrain / plain (throughput) | peak RSS MiB plain / DeepSpeed / distrain |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, med, rss in rows:
        print(
            f"| {size} | {med['plain'] * 1e3:.1f} | {med['deepspeed'] * 1e3:.1f} | {med['distrain'] * 1e3:.1f} | "
            f"{med['deepspeed'] / med['distrain']:.3f}x | {med['plain'] / med['distrain']:.3f}x | "
            f"{rss['plain']:.0f} / {rss['deepspeed']:.0f} / {rss['distrain']:.0f} |"
        )


def generative(args, env: dict) -> None:
    """The generative models' rows: distrain against the plain loop of the same step."""
    rows = []
    for model in args.models.split(","):
        for size in args.sizes.split(","):
            res: dict[str, list[dict]] = {"plain": [], "distrain": []}
            for _ in range(args.repeats):
                for loop in res:
                    cmd = [sys.executable, __file__, "--loop", loop, "--model", model, "--size", size]
                    cmd += [
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--precision",
                        args.precision,
                    ]
                    res[loop].append(child_result(cmd, env, f"{loop} {model} {size}"))
            med = {k: statistics.median(r["step_s"] for r in v) for k, v in res.items()}
            rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in res.items()}
            rows.append((model, size, med, rss))
    print(
        f"| model | size ({args.precision}) | plain step ms | distrain step ms | distrain / plain (throughput) | peak RSS MiB plain / distrain |"
    )
    print("|---|---|---|---|---|---|")
    for model, size, med, rss in rows:
        print(
            f"| {model} | {size} | {med['plain'] * 1e3:.1f} | {med['distrain'] * 1e3:.1f} | "
            f"{med['plain'] / med['distrain']:.3f}x | {rss['plain']:.0f} / {rss['distrain']:.0f} |"
        )


if __name__ == "__main__":
    main()
