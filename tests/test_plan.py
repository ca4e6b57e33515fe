"""`distrain plan`: memory per GPU, time and energy of a config at any scale, checked against a real
DeepSpeed engine (model states, ZeRO 0-3 on 2 ranks) and against the tensors a forward saves."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from distrain.config import load_config
from distrain.plan import activation_bytes, activation_width, block_elements, model_states, plan
from tests.conftest import CONFIGS, REPO, cli, torchrun_cmd

TINY = CONFIGS / "gpt-cpu-tiny.yaml"


def test_a_1024_gpu_plan_takes_seconds_and_says_what_fits():
    t0 = time.perf_counter()
    out = cli(
        "plan",
        str(CONFIGS / "gpt-1b-zero3.yaml"),
        "--gpus",
        "1024",
        "--gpu",
        "H100",
        "--json",
        "train.global_batch_size=8192",
    )
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t0 < 60
    p = json.loads(out.stdout)
    assert p["gpus"] == 1024 and p["grad_accum"] == 1 and p["gpu_memory_gb"] == 80
    assert 1.0e9 < p["params"] < 1.1e9 and p["fits"] is True
    assert p["step"]["tokens"] == 8192 * 2048 and p["step"]["seconds"] > 0
    assert p["run_seconds"] == pytest.approx(p["step"]["seconds"] * 20000)
    assert p["energy_kwh"] > 0 and p["co2e_kg"] > 0 and p["checkpoint_bytes"] == 14 * p["params"]
    # ZeRO 3 over 1,024 ranks: the model states are a sliver, DeepSpeed's buckets and the activations are not
    b = p["per_gpu_bytes"]
    assert b["optimizer"] == pytest.approx(8 * p["params"] / 1024, rel=1e-6)
    assert b["reduce_bucket"] == 2 * 5e8 and b["activations"] > b["optimizer"]
    # the same model without ZeRO on a 24 GB card does not fit, and the plan names the change that does
    out = cli(
        "plan",
        str(CONFIGS / "gpt-1b-zero3.yaml"),
        "--gpus",
        "8",
        "--gpu",
        "L4",
        "parallel.zero_stage=0",
        "parallel.activation_checkpointing=false",
    )
    assert out.returncode == 0, out.stderr
    assert (
        "does not fit: activations is the largest term; try parallel.activation_checkpointing=true"
        in out.stdout
    )
    out = cli("plan", str(TINY), "--gpu", "B300")
    assert out.returncode == 1 and "not in the peak table; use one of H200 NVL, H200, H100 NVL" in out.stderr


def _saved_bytes(model, forward) -> int:
    """Bytes of the distinct storages (not the parameters) that ``forward()`` saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformer_activations_follow_the_tensors_a_forward_saves(arch, checkpointing):
    """Sizes the formula's coefficients were not read from: within 15 % of the bytes the forward
    saves (with activation checkpointing: the blocks' inputs, plus one block recomputed at a time)."""
    from distrain.models import get_spec

    cfg = load_config(
        TINY,
        [
            f"model.arch={arch}",
            "model.d_model=96",
            "model.d_ff=320",
            "model.n_layer=3",
            "model.n_head=6",
            "model.vocab_size=700",
            "data.seq_len=96",
            f"parallel.activation_checkpointing={str(checkpointing).lower()}",
        ],
    )
    spec = get_spec("gpt")
    torch.manual_seed(0)
    model = spec.build(cfg)

    saved = _saved_bytes(model, lambda: spec.loss(model, {"input_ids": torch.randint(0, 700, (3, 96))}))
    planned, how = activation_bytes(cfg, micro=3)
    if checkpointing:  # the block recomputed during backward is not saved by the forward
        planned -= 3 * 96 * block_elements(cfg)[0] * activation_width(cfg)
    assert "Korthikanti" in how
    assert planned == pytest.approx(saved, rel=0.15), (planned, saved)


def test_cnn_activations_are_traced_under_fake_tensors_like_a_real_forward():
    from distrain.models import get_spec

    cfg = load_config(CONFIGS / "resnet-cpu-tiny.yaml", [])
    planned, how = activation_bytes(cfg, micro=4)
    assert "fake tensors" in how
    spec = get_spec("resnet")
    model = spec.build(cfg)

    m = cfg.model
    batch = {
        "images": torch.randn(4, m.in_channels, m.image_size, m.image_size),
        "labels": torch.zeros(4, dtype=torch.long),
    }
    assert planned == pytest.approx(_saved_bytes(model, lambda: spec.loss(model, batch)), rel=0.02)


PROBE = r'''
import json, sys
import torch
from distrain.config import load_config
from distrain.models import build_model
from distrain.parallel import build_engine, init_distributed
from distrain.plan import REDUCE_BUCKET, _params, model_states, weight_bytes

def held(engine):
    """Bytes of the distinct storages the engine's parameters and optimizer hold, by where."""
    seen, memo = {}, set()
    def walk(obj, where, depth=0):
        if id(obj) in memo or depth > 8:
            return
        memo.add(id(obj))
        if isinstance(obj, torch.Tensor):
            for t in (obj, obj.grad, getattr(obj, "ds_tensor", None)):
                if t is not None and t.untyped_storage().data_ptr():
                    seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), where))
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, where if where != "opt" else f"opt.{k}", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, where, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            for k, v in vars(obj).items():
                walk(v, f"{where}.{k}" if where == "opt" else where, depth + 1)
    for p in engine.module.parameters():
        walk(p, "params")
    walk(engine.optimizer, "opt")
    bucket = sum(n for n, w in seen.values() if w == "opt.ipg_buckets")
    return sum(n for n, w in seen.values()) - bucket, bucket

out = []
for stage in (0, 1, 2, 3):
    for precision in ("fp32", "bf16"):
        cfg = load_config(sys.argv[1], [f"parallel.zero_stage={stage}", f"parallel.precision={precision}",
                                        "model.preset=mini", "cluster.workers=2", "run.device=cpu"])
        d = init_distributed(cfg)
        engine = build_engine(cfg, build_model(cfg), d.world_size, d.device)
        ids = torch.randint(0, 257, (2, 128))
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        got, bucket = held(engine)
        params, small, _ = _params(cfg)
        s = model_states(cfg, 2, params, small)
        out.append({"stage": stage, "precision": precision, "held": got, "bucket": bucket,
                    "planned": s["weights"] + s["master"] + s["optimizer"] + s["gradients"],
                    "planned_bucket": weight_bytes(cfg) * REDUCE_BUCKET if stage == 3 else 0})
        del engine, loss
if d.rank == 0:
    print("RESULT " + json.dumps(out))
'''


@pytest.mark.world_size
@pytest.mark.slow  # eight DeepSpeed engines on two ranks: about 2-5 minutes here
def test_planned_model_states_match_what_a_real_deepspeed_engine_holds(tmp_path):
    """ZeRO 0-3, fp32 and bf16, 2 ranks over gloo: the planned bytes per rank of weights, master
    copy, optimizer states and gradient partitions against the distinct tensors the engine holds
    after a step (within 2 %), and ZeRO 3's reduce bucket."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        torchrun_cmd(str(script), str(TINY)),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    rows = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert len(rows) == 8
    for r in rows:
        assert r["planned"] == pytest.approx(r["held"], rel=0.02), r
        assert r["bucket"] == r["planned_bucket"], r


def test_model_states_by_stage_and_offload():
    cfg = load_config(
        TINY,
        [
            "parallel.zero_stage=2",
            "parallel.precision=bf16",
            "parallel.offload_optimizer=true",
            "run.device=cuda",
        ],
    )
    s = model_states(cfg, 4, 1000, 0)
    assert (
        s["weights"] == 2000 and s["master"] == 0 and s["optimizer"] == 0 and s["cpu"] == (4 + 8) * 1000 / 4
    )
    plan_ = plan(load_config(TINY, []), gpu="A100")
    assert plan_["fits"] and plan_["gpus"] == 1 and plan_["gpu"] == "A100"
    assert plan_["checkpoint_bytes"] == 12 * plan_["params"]  # fp32, ZeRO 0: weights and Adam's moments


def test_the_planned_checkpoint_size_is_what_deepspeed_writes(in_workdir, tmp_path):
    from distrain.train import run

    cfg = load_config(
        TINY,
        [
            f"run.dir={tmp_path / 'r'}",
            "parallel.zero_stage=1",
            "train.steps=1",
            "train.eval_every=0",
            "data.eval_path=null",
        ],
    )
    run(cfg)
    ckpt = tmp_path / "r" / "checkpoints" / "step00000001"
    shards = sum(f.stat().st_size for f in ckpt.glob("model/*.pt") if "states" in f.name)  # DeepSpeed's files
    assert plan(cfg)["checkpoint_bytes"] == pytest.approx(shards, rel=0.05)
