"""Every model trains through DeepSpeed in one CPU process: ZeRO 0 and 2, fp32 and bf16; ZeRO 3 for gpt."""

from __future__ import annotations

import json

import pytest
import yaml

from distrain.config import load_config
from distrain.train import run
from tests.conftest import CONFIGS, read_jsonl

TEXT_KEYS = {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "elapsed_s"}

SMALL = {  # keep each run a few seconds on 2 cores
    "gpt": [],
    "lstm": ["model.d_hidden=128", "model.d_embed=64"],
    "resnet": ["train.micro_batch_size=16"],
}
CONFIG_OF = {"gpt": "gpt-cpu-tiny.yaml", "lstm": "lstm-cpu-tiny.yaml", "resnet": "resnet-cpu-tiny.yaml"}


def _config(tmp_path, model: str, *overrides: str, steps: int = 30):
    return load_config(
        CONFIGS / CONFIG_OF[model],
        [
            f"run.dir={tmp_path / 'run'}",
            f"train.steps={steps}",
            "train.log_every=1",
            "train.eval_every=0",
            "optim.warmup_steps=3",
            "checkpoint.at_end=false",
            *SMALL[model],
            *overrides,
        ],
    )


def train(tmp_path, model: str, *overrides: str, steps: int = 30, session=None):
    cfg = _config(tmp_path, model, *overrides, steps=steps)
    summary = run(cfg, session)
    return summary, read_jsonl(cfg.run.run_dir / "metrics.jsonl"), cfg.run.run_dir


def _falls(records, factor=0.8):
    losses = [r["loss"] for r in records if "loss" in r]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return last < factor * first, (first, last)


# bf16 convolutions on a CPU without native bf16 take minutes: those two runs are marked slow
LOSS_CASES = [
    pytest.param(
        m,
        s,
        p,
        marks=[pytest.mark.slow] if (m, p) == ("resnet", "bf16") or (m, s, p) == ("lstm", 2, "bf16") else [],
    )
    for m in ("gpt", "lstm", "resnet")
    for s in (0, 2)
    for p in ("fp32", "bf16")
]


@pytest.mark.parametrize("model, stage, precision", LOSS_CASES)
def test_loss_falls(in_workdir, tmp_path, model, stage, precision):
    summary, records, _ = train(
        tmp_path, model, f"parallel.zero_stage={stage}", f"parallel.precision={precision}"
    )
    assert summary["status"] == "completed" and summary["step"] == 30
    ok, (first, last) = _falls(records)
    assert ok, f"{model} ZeRO {stage} {precision}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_trains_gpt(in_workdir, tmp_path, precision):
    _, records, _ = train(tmp_path, "gpt", "parallel.zero_stage=3", f"parallel.precision={precision}")
    ok, (first, last) = _falls(records)
    assert ok, f"ZeRO 3 {precision}: loss {first:.3f} -> {last:.3f}"


def _activation_checkpointing(module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now a deprecated alias) to is_activation_checkpointing
    if hasattr(type(module), "is_activation_checkpointing"):
        return module.is_activation_checkpointing
    return module.is_gradient_checkpointing


def test_llama_arch_grad_accum_and_activation_checkpointing(in_workdir, tmp_path):
    from transformers import LlamaForCausalLM

    from distrain.train import setup

    overrides = [
        "model.arch=llama",
        "model.n_kv_head=2",
        "parallel.grad_accum=2",
        "parallel.activation_checkpointing=true",
        "parallel.zero_stage=2",
    ]
    s = setup(_config(tmp_path, "gpt", *overrides))
    module = s.engine.module
    assert isinstance(module, LlamaForCausalLM), type(module)
    assert module.config.num_key_value_heads == 2 and module.config.num_attention_heads == 4  # GQA
    assert _activation_checkpointing(module)  # every block recomputes its activations in backward
    summary, records, _ = train(tmp_path, "gpt", *overrides, session=s)
    assert summary["samples_seen"] == 30 * 8 * 2
    ok, (first, last) = _falls(records)
    assert ok, f"llama: loss {first:.3f} -> {last:.3f}"


def test_metrics_jsonl_keys_and_run_files(in_workdir, tmp_path):
    summary, records, run_dir = train(tmp_path, "gpt", "train.log_every=2", "train.eval_every=4", steps=8)
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    for r in train_recs:
        assert TEXT_KEYS <= set(r), set(r)
        assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 128)
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    elapsed = [r["elapsed_s"] for r in train_recs]
    assert elapsed == sorted(elapsed)
    # the resolved config is written and loads back to the same tree
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.steps == 8 and cfg.run.dir == str(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"] == "gpt"
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "completed" and done["tokens_seen"] == 8 * 8 * 128


def test_image_metrics_have_no_token_rate(in_workdir, tmp_path):
    _, records, _ = train(tmp_path, "resnet", "train.log_every=2", steps=4)
    recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4]
    assert all("tokens_per_s" not in r and r["samples_per_s"] > 0 for r in recs)


def test_warmup_starts_above_zero_and_cosine_ends_at_floor(in_workdir, tmp_path):
    _, records, _ = train(
        tmp_path, "gpt", "optim.warmup_steps=4", "optim.lr=0.01", "optim.min_lr_ratio=0.1", steps=12
    )
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(0.01 / 5)  # step 1 of 4 warmup steps: lr/(W+1), never 0
    assert lrs[:4] == sorted(lrs[:4])
    assert lrs[-1] == pytest.approx(0.001)


@pytest.mark.parametrize("stage", [0, 2])
def test_fused_adamw_client_optimizer_trains_as_deepspeeds_own(in_workdir, tmp_path, stage):
    """optim.fused hands torch's fused AdamW to DeepSpeed as a client optimizer (the default on
    CUDA); its steps, schedule and clipping match DeepSpeed's own torch AdamW step for step."""
    from distrain.train import setup

    runs = {}
    for fused in (False, True):
        cfg = load_config(
            CONFIGS / "gpt-cpu-tiny.yaml",
            [
                f"run.dir={tmp_path / f'fused{fused}'}",
                "train.steps=12",
                "train.log_every=1",
                "train.eval_every=0",
                "checkpoint.at_end=false",
                f"parallel.zero_stage={stage}",
                f"optim.fused={fused}",
            ],
        )
        s = setup(cfg)
        assert bool(s.engine.basic_optimizer.defaults.get("fused")) is fused
        run(cfg, s)
        runs[fused] = read_jsonl(cfg.run.run_dir / "metrics.jsonl")
    assert [r["lr"] for r in runs[True]] == pytest.approx([r["lr"] for r in runs[False]])
    assert [r["loss"] for r in runs[True]] == pytest.approx([r["loss"] for r in runs[False]], rel=1e-4)
    ok, (first, last) = _falls(runs[True], factor=0.9)
    assert ok, f"fused AdamW ZeRO {stage}: loss {first:.3f} -> {last:.3f}"
