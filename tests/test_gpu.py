"""The CUDA path: fused AdamW, TF32, pinned memory, channels_last and cuDNN's autotuner for CNNs,
fp16 with dynamic loss scaling, ZeRO-Offload, activation checkpointing, compiled steps, NVML energy,
exact resume, and no host sync off log steps. Needs one CUDA GPU: `bash benchmarks/gpu_check.sh` runs these
(`-m gpu`); the default suite deselects them."""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch

from distrain.config import load_config
from distrain.train import run, setup
from tests.conftest import CONFIGS, REPO, read_jsonl

pytestmark = pytest.mark.gpu

CONFIG_OF = {"gpt": "gpt-cpu-tiny.yaml", "resnet": "resnet-cpu-tiny.yaml"}


def _cfg(tmp_path, model="gpt", *overrides, steps=30, name="run"):
    return load_config(
        CONFIGS / CONFIG_OF[model],
        [
            "run.device=cuda",
            f"run.dir={tmp_path / name}",
            f"train.steps={steps}",
            "train.log_every=5",
            "train.eval_every=0",
            "optim.warmup_steps=3",
            "checkpoint.at_end=false",
            "tracking.progress_bar=false",
            *overrides,
        ],
    )


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _falls(losses, factor=0.8):
    return losses[-1] < factor * losses[0], losses


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_trains_with_fused_adamw_tf32_and_pinned_batches(in_workdir, tmp_path, stage):
    cfg = _cfg(tmp_path, "gpt", "parallel.precision=bf16", f"parallel.zero_stage={stage}")
    s = setup(cfg)
    assert s.engine.basic_optimizer.defaults["fused"] is True  # torch's fused kernel, no C++ build
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert s.trainer.data.pin
    assert next(s.engine.module.parameters()).device.type == "cuda"
    summary = run(cfg, s)
    assert summary["status"] == "completed"
    ok, losses = _falls(_losses(cfg.run.run_dir))
    assert ok, losses


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_fp32_without_tf32_and_unfused(in_workdir, tmp_path):
    saved = _tf32_flags()
    try:
        cfg = _cfg(tmp_path, "gpt", "parallel.tf32=false", "optim.fused=false")
        s = setup(cfg)
        assert _tf32_flags() == (False, False)
        assert not s.engine.basic_optimizer.defaults.get("fused")
        during = []  # the flags at every forward of the run
        s.engine.module.register_forward_pre_hook(lambda module, args: during.append(_tf32_flags()))
        summary = run(cfg, s)
        assert summary["status"] == "completed" and summary["step"] == 30
        assert len(during) >= 30 and set(during) == {(False, False)}, set(during)
        ok, losses = _falls(_losses(cfg.run.run_dir))
        assert ok, losses
    finally:  # the next tests get the flags as they were
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_dynamic_loss_scaling_recovers_from_overflow(in_workdir, tmp_path, stage):
    """A loss scale of 2**30 overflows fp16 at once: those steps are skipped, the scale halves until
    gradients fit, and training goes on with the loss falling."""
    cfg = _cfg(
        tmp_path,
        "gpt",
        "parallel.precision=fp16",
        f"parallel.zero_stage={stage}",
        "parallel.loss_scale_power=30",
        steps=60,
    )
    summary = run(cfg)
    assert summary["status"] == "completed"
    recs = [r for r in read_jsonl(cfg.run.run_dir / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["skipped_steps"] >= 5  # 2**30 -> fits only after several halvings
    assert recs[-1]["loss_scale"] < 2**30
    losses = [r["loss"] for r in recs if r["step"] > recs[-1]["skipped_steps"] + 5]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.zero_stage=2", "parallel.offload_optimizer=true"],
        ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"],
    ],
    ids=["zero2-offload-optimizer", "zero3-offload-optimizer-params"],
)
def test_zero_offload(in_workdir, tmp_path, overrides):
    cfg = _cfg(tmp_path, "gpt", "parallel.precision=bf16", *overrides)
    s = setup(cfg)
    assert type(s.engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
    run(cfg, s)
    ok, losses = _falls(_losses(cfg.run.run_dir))
    assert ok, losses


def test_activation_checkpointing_same_losses_less_memory(in_workdir, tmp_path):
    common = ["model.preset=mini", "data.seq_len=256", "parallel.precision=bf16", "optim.fused=true"]
    peaks, losses = {}, {}
    for ac in (False, True):
        torch.cuda.reset_peak_memory_stats()
        cfg = _cfg(
            tmp_path, "gpt", *common, f"parallel.activation_checkpointing={ac}", steps=10, name=f"ac{ac}"
        )
        run(cfg)
        peaks[ac] = torch.cuda.max_memory_allocated()
        losses[ac] = _losses(cfg.run.run_dir)
    assert peaks[True] < peaks[False], peaks
    assert losses[True] == pytest.approx(losses[False], rel=2e-2), losses


def test_resnet_channels_last_and_cudnn_benchmark(in_workdir, tmp_path):
    cfg = _cfg(tmp_path, "resnet", "parallel.precision=bf16", "train.micro_batch_size=32", steps=40)
    s = setup(cfg)
    conv = next(m for m in s.engine.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark
    assert s.trainer.channels_last
    run(cfg, s)
    ok, losses = _falls(_losses(cfg.run.run_dir))
    assert ok, losses


@pytest.mark.parametrize("model, stage", [("gpt", 3), ("resnet", 0)])
def test_compiled_steps_on_cuda_train_as_eager_ones(in_workdir, tmp_path, model, stage):
    over = ["parallel.precision=bf16", f"parallel.zero_stage={stage}", "checkpoint.every_steps=20"]
    losses = {}
    for compiled in (False, True):
        cfg = _cfg(tmp_path, model, *over, f"parallel.compile={compiled}", steps=20, name=f"c{compiled}")
        s = setup(cfg)
        assert s.engine.is_compiled == compiled
        run(cfg, s)
        losses[compiled] = _losses(cfg.run.run_dir)
    assert losses[True] == pytest.approx(losses[False], rel=5e-2), losses
    saved = tmp_path / "cTrue" / "checkpoints"
    assert not [p for p in saved.rglob("*") if p.is_file() and b"_orig_mod" in p.read_bytes()]


def test_nvml_energy_counter(in_workdir, tmp_path):
    cfg = _cfg(tmp_path, "gpt", "parallel.precision=bf16", "model.preset=mini", steps=20)
    run(cfg)
    rec = [r for r in read_jsonl(cfg.run.run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert "nvml" in rec["energy_source"] and not rec["energy_estimated"], rec
    assert rec["energy_j"] > 0 and rec["power_w"] > 10, rec
    assert rec["mfu"] is not None and 0 < rec["mfu"] < 1, rec


def test_resume_on_cuda_matches_uninterrupted(in_workdir, tmp_path):
    """A 20-step run stopped at step 10 (a preemption notice: checkpoint, stop) and resumed has
    the 20-step run's schedule and losses throughout."""
    common = ["parallel.precision=bf16", "parallel.zero_stage=2", "train.log_every=1"]
    whole = _cfg(tmp_path, "gpt", *common, steps=20, name="whole")
    run(whole)
    first = _cfg(tmp_path, "gpt", *common, "checkpoint.every_steps=10", steps=20, name="split")
    s = setup(first)

    def notice_in_step_10(module, args):
        if s.trainer.step == 9:  # step 10 is in flight: what the SIGUSR1 handler does
            s.trainer.request_stop("preempted")

    s.engine.module.register_forward_pre_hook(notice_in_step_10)
    stopped = run(first, s)
    assert stopped["status"] == "preempted" and stopped["step"] == 10, stopped
    assert (first.run.run_dir / "checkpoints" / "step00000010" / "manifest.json").is_file()
    second = load_config(first.run.run_dir / "config.yaml")  # the run's own config: 20 steps
    resumed = setup(second)
    assert resumed.trainer.step == 10
    assert run(second, resumed)["status"] == "completed"
    recs = [r for r in read_jsonl(second.run.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 21))  # each step once, across the resume
    a, b = _losses(whole.run.run_dir), [r["loss"] for r in recs]
    assert b == pytest.approx(a, rel=1e-3), (a, b)  # GPU kernels are not bitwise deterministic


TORCH_DIR = str(Path(torch.__file__).parent)
SYNC_FREE = [
    REPO / "distrain" / p for p in ("trainer.py", "metrics", "parallel", "tracking.py", "checkpoint.py")
]


def test_no_host_sync_off_log_steps(in_workdir, tmp_path):
    """torch's sync debug mode warns at every call that waits for the GPU; none may come from
    distrain's step code except on log steps (DeepSpeed's own are DeepSpeed's)."""
    cfg = _cfg(
        tmp_path, "gpt", "parallel.precision=bf16", "parallel.grad_accum=2", "train.log_every=4", steps=12
    )
    s = setup(cfg)
    seen = []

    def record(message, category, filename, lineno, file=None, line=None):
        # the innermost caller outside torch's own wrappers made the sync: distrain's, or another
        # library's (DeepSpeed's, transformers') even when distrain called into that library
        for fs in reversed(traceback.extract_stack()[:-1]):
            if fs.filename.startswith(TORCH_DIR) or fs.filename.endswith("warnings.py"):
                continue
            if any(fs.filename.startswith(str(p)) for p in SYNC_FREE):
                seen.append((s.trainer.step, f"{fs.filename}:{fs.lineno}", str(message)[:80]))
            return

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(cfg, s)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    off_log = [r for r in seen if r[0] in (1, 2, 5, 6, 9, 10)]
    assert not off_log, off_log
    assert [r for r in seen if r[0] in (4, 8, 12)], "the debug mode reported no sync even on log steps"


@pytest.mark.parametrize("stage", [0, 3])
def test_the_plan_matches_the_memory_a_gpu_run_allocates(in_workdir, tmp_path, stage):
    """`distrain plan`'s total per GPU against torch.cuda.max_memory_allocated of the same config
    (the mini GPT, bf16, one GPU), within 25 %: model states, DeepSpeed's buffers, activations."""
    from distrain.plan import plan

    cfg = _cfg(
        tmp_path,
        "gpt",
        "model.preset=mini",
        "parallel.precision=bf16",
        f"parallel.zero_stage={stage}",
        steps=5,
    )
    torch.cuda.reset_peak_memory_stats()
    summary = run(cfg, setup(cfg))
    assert summary["status"] == "completed"
    peak = torch.cuda.max_memory_allocated()
    planned = plan(cfg, gpus=1, gpu=torch.cuda.get_device_name())["total_bytes"]
    assert planned == pytest.approx(peak, rel=0.25), (planned, peak)
