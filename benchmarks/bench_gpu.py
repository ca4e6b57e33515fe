"""distrain on one CUDA GPU against a plain PyTorch loop of the same model, optimizer and batches.

    python benchmarks/bench_gpu.py [--results benchmarks/RESULTS.md] [--dry-run]

Rows, each loop in its own process (so each peak memory is its own):
- llama-1b: the `gpt-1b-zero3` shape (16 layers, d 2048, GQA 32/8 heads, vocab 32000) at seq 2048,
  bf16, no activation checkpointing, micro batch 8: distrain ZeRO 0 and ZeRO 3 (one GPU) and a plain
  loop (fp32 weights, bf16 autocast, torch's fused AdamW, the same warmup-cosine schedule and
  clipping). tokens/s, MFU (PaLM's FLOPs / the card's dense bf16 peak), peak memory, GPU joules per
  step from NVML's energy counter.
- resnet50: bf16, channels_last, 224 px synthetic images (an ImageFolder of JPEGs written first),
  micro batch 128: distrain (reading and augmenting the files in DataLoader workers) against a plain
  loop over the same images decoded once into GPU memory. images/s.
- gan, vae: the `gan-64-gpu` and `vae-64-gpu` shapes (64 px RGB, micro batch 128, bf16 autocast)
  on the synthetic images: distrain (two engines for the GAN) against a plain loop of the same step
  (one fused AdamW per part, the updates in turn, the other part frozen). images/s.
- checkpoint: distrain's save (DeepSpeed shards + manifest + hashes) and load of the llama-1b ZeRO-0
  state against torch.save / torch.load of the plain loop's model and optimizer state.
- long context: the llama-1b shape, micro batch 1, activation checkpointing, at 8k, 16k, 32k...
  tokens a sequence until one does not fit: the longest that fits at sp 1, its peak memory and
  tokens/s, against `distrain plan`'s bytes per GPU at that length for sp 1 and for sp 2 on two
  cards (one card cannot host the two ranks of an NCCL group, so sp 2's figure is the plan's).

Each loop syncs the GPU only every `--window` steps (distrain's log steps; the plain loop's timing
points); the first window is warm-up and the median of the others is reported.
--dry-run: tiny shapes on the CPU, a few steps: checks the script end to end without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# the generative rows: the 64 px GPU configs on the synthetic images; a small 32 px shape for the dry run
GENERATIVE = (
    ["train.micro_batch_size=128", "data.num_workers=12", "model.num_classes=10"],
    [
        "model.image_size=32",
        "model.width=8",
        "train.micro_batch_size=4",
        "data.num_workers=0",
        "model.num_classes=10",
    ],
)
SHAPES = {  # name: config, overrides (GPU), overrides (dry run on the CPU)
    "llama": (
        "gpt-1b-zero3.yaml",
        ["data.seq_len=2048", "train.micro_batch_size=8", "parallel.activation_checkpointing=false"],
        [
            "model.preset=tiny",
            "model.vocab_size=512",
            "data.seq_len=64",
            "model.max_seq_len=64",
            "train.micro_batch_size=2",
            "parallel.activation_checkpointing=false",
        ],
    ),
    "resnet": (
        "resnet50-imagenet-gpu.yaml",
        ["train.micro_batch_size=128", "data.num_workers=12", "model.num_classes=10"],
        [
            "model.depth=18",
            "model.image_size=32",
            "train.micro_batch_size=4",
            "data.num_workers=0",
            "model.num_classes=10",
        ],
    ),
    "gan": (
        "gan-64-gpu.yaml",
        *GENERATIVE,
    ),
    "vae": (
        "vae-64-gpu.yaml",
        *GENERATIVE,
    ),
}


def _cfg(args, model: str, run_dir: str, extra: list[str]):
    from distrain.config import load_config

    name, gpu, cpu = SHAPES[model]
    data = Path(args.data)
    paths = (
        [f"data.train_path={data}/pydoc/train-*.jsonl", "data.tokenizer=bytes"]
        if model == "llama"
        else [f"data.train_path={data}/synthetic"]
    )
    return load_config(
        REPO / "configs" / name,
        [
            *(cpu if args.dry_run else gpu),
            *paths,
            "data.eval_path=null",
            "run.device=" + ("cpu" if args.dry_run else "cuda"),
            f"run.dir={run_dir}",
            f"train.steps={args.steps}",
            f"train.log_every={args.window}",
            "train.eval_every=0",
            "train.global_batch_size=null",
            "parallel.grad_accum=1",
            "parallel.precision=bf16",
            "checkpoint.at_end=false",
            "checkpoint.every_steps=0",
            "cluster.workers=1",
            "tracking.progress_bar=false",
            "tracking.wandb.mode=disabled",
            "run.log_level=WARNING",
            *extra,
        ],
    )


def _device(args):
    import torch

    return torch.device("cpu" if args.dry_run else "cuda")


def _peak_mem_gib(args) -> float | None:
    import torch

    return None if args.dry_run else torch.cuda.max_memory_allocated() / 2**30


def _nvml(args):
    """GPU energy counter (J) of device 0, or None (dry run, or no counter)."""
    if args.dry_run:
        return None
    import torch

    from distrain.metrics.energy import NvmlReader, gpu_uuid

    try:
        return NvmlReader([gpu_uuid(torch.device("cuda", 0))])
    except Exception:  # noqa: BLE001 - reported as missing, not guessed
        return None


# ------------------------------------------------------------------------------------ distrain
def child_distrain(args) -> dict:

    from distrain.train import setup

    tmp = tempfile.mkdtemp(prefix="bench-gpu-", dir=args.scratch)
    cfg = _cfg(args, args.model, f"{tmp}/run", [f"parallel.zero_stage={args.zero}"])
    s = setup(cfg)
    # the GPU's NVML counter at each record (distrain has just synchronized the device there)
    energy, joules, log_record = _nvml(args), [], s.tracker.log

    def log_with_energy(record):
        joules.append(energy.read() if energy else None)
        log_record(record)

    s.tracker.log = log_with_energy
    s.trainer.train()
    recs = [json.loads(x) for x in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "world_size" in r][1:]  # training records; the first window is warm-up
    rate_key = "tokens_per_s" if args.model == "llama" else "samples_per_s"
    out = {
        "rate": statistics.median(r[rate_key] for r in recs),
        "mfu": statistics.median(r["mfu"] for r in recs) if recs[0]["mfu"] is not None else None,
        "data_wait_pct": statistics.median(r["data_wait_pct"] for r in recs),
        "peak_mem_gib": _peak_mem_gib(args),
        "loss": recs[-1].get("loss", recs[-1].get("loss_generator")),
    }
    if energy is not None and len(joules) > 2:
        out["j_per_step"] = (joules[-1] - joules[1]) / (args.window * (len(joules) - 2))
        out["energy_source"] = energy.kind
        energy.close()
    if args.checkpoint:
        ck = s.trainer.checkpointer
        t0 = time.perf_counter()
        path = ck.save(s.trainer.step)
        ck.writer.wait()
        out["save_s"] = time.perf_counter() - t0
        out["ckpt_gib"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
        out["run_dir"] = str(cfg.run.run_dir)
    s.tracker.close()
    s.trainer.data.close()
    s.trainer.checkpointer.close()
    s.trainer.meters.close()
    return out


LONG = (8192, 16384, 32768, 65536, 131072)  # sequence lengths tried (dry run: the tiny shape's)
LONG_GPU = ["train.micro_batch_size=1", "parallel.activation_checkpointing=true"]


def _long_cfg(args, run_dir: str):
    seq = args.seq
    return _cfg(
        args,
        "llama",
        run_dir,
        [
            *([] if args.dry_run else LONG_GPU),
            f"data.seq_len={seq}",
            f"model.max_seq_len={seq}",
            "parallel.zero_stage=0",
        ],
    )


def child_long(args) -> dict:
    """One long-context run at ``--seq`` tokens: its rate and peak memory, or that it did not fit."""
    import torch

    from distrain.train import setup

    tmp = tempfile.mkdtemp(prefix="bench-gpu-", dir=args.scratch)
    cfg = _long_cfg(args, f"{tmp}/run")
    try:
        s = setup(cfg)
        s.trainer.train()
    except torch.cuda.OutOfMemoryError:
        return {"seq": args.seq, "fits": False}
    recs = [json.loads(x) for x in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "world_size" in r][1:]
    out = {
        "seq": args.seq,
        "fits": True,
        "rate": statistics.median(r["tokens_per_s"] for r in recs),
        "peak_mem_gib": _peak_mem_gib(args),
    }
    s.tracker.close()
    s.trainer.data.close()
    s.trainer.meters.close()
    return out


def long_context(args) -> dict:
    """The longest sequence that fits at sp 1 on this card, and the plan's bytes a GPU at sp 1 and sp 2."""
    from distrain.plan import plan

    seqs = (64, 128) if args.dry_run else LONG
    short = argparse.Namespace(**{**vars(args), "steps": 6, "window": 2})  # 2 timed windows a length
    best = None
    for seq in seqs:
        res = _child(short, "long", "llama", ["--seq", str(seq)])
        if not res["fits"]:
            break
        best = res
    if best is None:
        return {"seq": None}
    args.seq = best["seq"]
    cfg = _long_cfg(args, str(Path(args.scratch) / "plan"))
    planned = {}
    for sp in (1, 2):
        c = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"sequence_parallel": sp})})
        planned[sp] = plan(c, 2 if sp == 2 else 1)["total_bytes"] / 2**30
    return {**best, "planned_sp1_gib": planned[1], "planned_sp2_gib": planned[2], "tried": list(seqs)}


def child_load(args) -> dict:
    """Resume the run a distrain child saved: the time of the checkpoint load alone (verify the
    manifest's hashes, DeepSpeed's load, distrain's state), in a fresh process."""
    import torch

    from distrain.checkpoint import Checkpointer
    from distrain.train import setup

    cfg = _cfg(args, args.model, args.run_dir, [f"parallel.zero_stage={args.zero}", "checkpoint.resume=true"])
    timed, load = {}, Checkpointer.load

    def timed_load(self, plan):
        t0 = time.perf_counter()
        step = load(self, plan)
        if not args.dry_run:
            torch.cuda.synchronize()
        timed["load_s"] = time.perf_counter() - t0
        return step

    Checkpointer.load = timed_load
    s = setup(cfg)
    assert s.trainer.step == args.steps, s.trainer.step
    s.tracker.close()
    s.trainer.data.close()
    s.trainer.checkpointer.close()
    return timed


# --------------------------------------------------------------------------------- plain loops
def _batches(cfg, n: int, dev) -> list[dict]:
    """distrain's own batches for the first n steps, copied to the device beforehand."""
    from distrain.data import DataPipeline, to_device
    from distrain.parallel.engine import channels_last

    it = DataPipeline(cfg).train_batches()
    cl = channels_last(cfg, dev)
    out = []
    for _ in range(n):
        b = to_device(next(it), dev, cl)
        out.append(b)
    return out


def child_plain_parts(args) -> dict:
    """The plain loop of a model of several parts (or with a state): one fused AdamW per part, the
    model's updates in turn under bf16 autocast, the other parts frozen."""
    import torch

    from distrain.models import build_parts, get_spec
    from distrain.parallel.engine import channels_last, param_groups

    dev = _device(args)
    tmp = tempfile.mkdtemp(prefix="bench-gpu-", dir=args.scratch)
    cfg = _cfg(args, args.model, f"{tmp}/run", [])
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    n_distinct = min(args.steps, 8)
    batches = _batches(cfg, n_distinct, dev)
    spec = get_spec(cfg.model.name)
    parts = {k: m.to(dev) for k, m in build_parts(cfg).items()}
    if channels_last(cfg, dev):
        parts = {k: m.to(memory_format=torch.channels_last) for k, m in parts.items()}
    opts, clips = {}, {}
    for k, m in parts.items():
        pc = cfg.for_part(k)
        o = pc.optim
        opts[k] = torch.optim.AdamW(
            param_groups(m, o.weight_decay),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=dev.type == "cuda",
        )
        clips[k] = pc.parallel.grad_clip
    state = spec.state(cfg) if spec.state else None
    updates = spec.steps(cfg)
    marks = []

    def mark():
        if not args.dry_run:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    mark()
    for step in range(args.steps):
        b = batches[step % n_distinct]
        for u in updates:
            for k, m in parts.items():
                m.requires_grad_(k == u.part)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = u.loss(parts, b, state)
            loss.backward()
            if clips[u.part] > 0:
                torch.nn.utils.clip_grad_norm_(parts[u.part].parameters(), clips[u.part])
            opts[u.part].step()
            opts[u.part].zero_grad(set_to_none=True)
        if state is not None:
            state.after_step()
        if (step + 1) % args.window == 0:
            mark()
    per_window = [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]
    step_s = statistics.median(per_window) / args.window
    return {"rate": cfg.train.micro_batch_size / step_s, "mfu": None, "peak_mem_gib": _peak_mem_gib(args)}


def child_plain(args) -> dict:
    import torch

    from distrain.models import get_spec as _spec

    if _spec(_cfg(args, args.model, tempfile.mkdtemp(dir=args.scratch), []).model.name).loss is None:
        return child_plain_parts(args)

    from distrain.metrics.peak import gpu_peak_flops
    from distrain.models import build_model, get_spec
    from distrain.parallel.engine import channels_last, param_groups

    dev = _device(args)
    tmp = tempfile.mkdtemp(prefix="bench-gpu-", dir=args.scratch)
    cfg = _cfg(args, args.model, f"{tmp}/run", [])
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = args.model == "resnet"
    n_distinct = min(args.steps, 8)  # a few distinct batches, cycled: the loop is the subject here
    batches = _batches(cfg, n_distinct, dev)
    model = build_model(cfg).to(dev)
    if channels_last(cfg, dev):
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True
    )
    from bench_loop import _lr_lambda  # distrain's schedule as LambdaLR factors

    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    spec = get_spec(cfg.model.name)
    energy = _nvml(args)
    window_loss = torch.zeros((), device=dev)
    marks, joules = [], []

    def mark():
        if not args.dry_run:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        joules.append(energy.read() if energy else None)

    mark()
    for step in range(args.steps):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = spec.loss(model, batches[step % n_distinct])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.parallel.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window_loss += loss.detach().float()
        if (step + 1) % args.window == 0:
            mark()
    per_window = [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]
    step_s = statistics.median(per_window) / args.window
    samples = cfg.train.micro_batch_size
    rate = samples * (cfg.data.seq_len if args.model == "llama" else 1) / step_s
    peak = None if args.dry_run else gpu_peak_flops(torch.cuda.get_device_name(), "bf16")[0]
    flops = samples * spec.flops_per_sample(cfg)
    out = {
        "rate": rate,
        "mfu": flops / step_s / peak if peak else None,
        "peak_mem_gib": _peak_mem_gib(args),
        "loss": float(window_loss) / args.steps,
    }
    if energy is not None:
        out["j_per_step"] = (joules[-1] - joules[1]) / (args.window * (len(joules) - 2))
        out["energy_source"] = energy.kind
    if args.checkpoint:
        path = Path(tmp) / "plain.pt"
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        t0 = time.perf_counter()
        torch.save(state, path)
        os.sync()
        out["save_s"] = time.perf_counter() - t0
        out["ckpt_gib"] = path.stat().st_size / 2**30
        t0 = time.perf_counter()
        loaded = torch.load(path, map_location=dev, weights_only=True)
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
        if not args.dry_run:
            torch.cuda.synchronize()
        out["load_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------- driver
def synthetic_images(root: Path, n: int, size: int, classes: int = 10) -> None:
    """An ImageFolder of n smooth random JPEGs (size x size), written once."""
    import numpy as np
    from PIL import Image

    if (root / "done").exists():
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text(str(n))


def _child(args, loop: str, model: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        loop,
        "--model",
        model,
        "--steps",
        str(args.steps),
        "--window",
        str(args.window),
        "--data",
        args.data,
        "--scratch",
        args.scratch,
        *extra,
    ]
    if args.dry_run:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(
            f"bench_gpu: {loop} {model} {' '.join(extra)} failed (exit {p.returncode}):\n{p.stderr[-4000:]}"
        )
    res = json.loads(line[0][7:])
    res["wall_s"] = time.perf_counter() - t0
    print(f"  {loop} {model} {' '.join(extra)}: {json.dumps(res)}", flush=True)
    return res


def _fmt(x, spec=".1f", none="n/a"):
    return none if x is None else format(x, spec)


def table(card: str, rows: dict, command: str) -> str:
    llama_plain, resnet_plain = rows["llama plain"], rows["resnet plain"]
    lines = [
        f"### {card}",
        "",
        f"`{command}` (torch {rows['meta']['torch']}, CUDA {rows['meta']['cuda']}, deepspeed "
        f"{rows['meta']['deepspeed']}, {rows['meta']['date']})",
        "",
        "| run | rate | vs plain loop | MFU | peak memory GiB | GPU J/step | data wait % |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, unit, plain in (
        ("llama plain", "tok/s", llama_plain),
        ("llama distrain ZeRO 0", "tok/s", llama_plain),
        ("llama distrain ZeRO 3", "tok/s", llama_plain),
        ("resnet plain", "img/s", resnet_plain),
        ("resnet distrain ZeRO 0", "img/s", resnet_plain),
        ("gan plain", "img/s", rows["gan plain"]),
        ("gan distrain ZeRO 1", "img/s", rows["gan plain"]),
        ("vae plain", "img/s", rows["vae plain"]),
        ("vae distrain ZeRO 2", "img/s", rows["vae plain"]),
    ):
        r = rows[key]
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(
            f"| {key} | {r['rate']:,.0f} {unit} | {r['rate'] / plain['rate']:.3f}x | {_fmt(mfu)}{'%' if mfu else ''} "
            f"| {_fmt(r['peak_mem_gib'])} | {_fmt(r.get('j_per_step'), '.0f')} | {_fmt(r.get('data_wait_pct'))} |"
        )
    lc = rows.get("long context")
    if lc and lc.get("seq"):
        lines += [
            "",
            "| long context (llama-1b, micro batch 1, activation checkpointing) | tokens | tok/s | peak memory GiB | planned GiB a GPU, sp 1 / sp 2 (2 cards) |",
            "|---|---|---|---|---|",
            f"| longest that fits at sp 1 | {lc['seq']:,} | {lc['rate']:,.0f} | {_fmt(lc['peak_mem_gib'])} "
            f"| {lc['planned_sp1_gib']:.2f} / {lc['planned_sp2_gib']:.2f} |",
        ]
    d, p = rows["llama distrain ZeRO 0"], llama_plain
    lines += [
        "",
        "| checkpoint (llama-1b state) | size GiB | save s | load s |",
        "|---|---|---|---|",
        f"| distrain (DeepSpeed shards, manifest, sha256) | {d['ckpt_gib']:.1f} | {d['save_s']:.1f} | {d['load_s']:.1f} |",
        f"| torch.save / torch.load | {p['ckpt_gib']:.1f} | {p['save_s']:.1f} | {p['load_s']:.1f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="append the table to this markdown file (under '## GPU check')")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="steps per loop (default 20; dry run 4)")
    ap.add_argument("--window", type=int, default=None, help="steps per timing window (default 5; dry run 2)")
    ap.add_argument("--data", default=None, help="where the data is prepared (default: a temp dir)")
    ap.add_argument("--scratch", default=None, help="where runs and checkpoints go (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.dry_run else 20)
    args.window = args.window or (2 if args.dry_run else 5)
    if args.child:
        children = {"distrain": child_distrain, "load": child_load, "plain": child_plain, "long": child_long}
        res = children[args.child](args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    import deepspeed
    import torch

    args.scratch = args.scratch or tempfile.mkdtemp(prefix="bench-gpu-")
    args.data = args.data or str(Path(args.scratch) / "data")
    t0 = time.perf_counter()
    from distrain.data.prepare import prepare_pydoc

    prepare_pydoc(Path(args.data))
    synthetic_images(Path(args.data) / "synthetic", 64 if args.dry_run else 2048, 32 if args.dry_run else 256)
    print(f"data ready in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = {
        "llama plain": _child(args, "plain", "llama", ["--checkpoint"]),
        "llama distrain ZeRO 0": _child(args, "distrain", "llama", ["--zero", "0", "--checkpoint"]),
        "llama distrain ZeRO 3": _child(args, "distrain", "llama", ["--zero", "3"]),
    }
    saved = rows["llama distrain ZeRO 0"]
    saved.update(_child(args, "load", "llama", ["--zero", "0", "--run-dir", saved["run_dir"]]))
    rows |= {
        "resnet plain": _child(args, "plain", "resnet", []),
        "resnet distrain ZeRO 0": _child(args, "distrain", "resnet", ["--zero", "0"]),
        "gan plain": _child(args, "plain", "gan", []),
        "gan distrain ZeRO 1": _child(args, "distrain", "gan", ["--zero", "1"]),
        "vae plain": _child(args, "plain", "vae", []),
        "vae distrain ZeRO 2": _child(args, "distrain", "vae", ["--zero", "2"]),
        "long context": long_context(args),
    }
    card = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    rows["meta"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    text = table(card, rows, "bash benchmarks/gpu_check.sh")
    print(text, flush=True)
    if args.results:
        path = Path(args.results)
        body = path.read_text() if path.exists() else "# Benchmark results\n"
        if "\n## GPU check" not in body:
            body = body.rstrip() + "\n\n## GPU check (`benchmarks/gpu_check.sh`)\n\n"
        path.write_text(body.rstrip() + "\n\n" + text)
        print(f"rows written to {path}", flush=True)


if __name__ == "__main__":
    main()
