"""Every shipped config validates; each CPU one trains 2 steps; GPU ones are refused on a CPU machine
before anything starts, with the key to change."""

from __future__ import annotations

import pytest
import torch
import yaml

from distrain.config import load_config
from distrain.errors import TopologyError
from distrain.parallel import check_device
from distrain.train import run
from tests.conftest import CONFIGS, read_jsonl

ALL = sorted(p.name for p in CONFIGS.glob("*.yaml"))
CPU = [n for n in ALL if load_config(CONFIGS / n).run.device == "cpu"]
GPU = [n for n in ALL if n not in CPU]


def test_there_are_cpu_and_gpu_configs():
    assert {"gpt-cpu-tiny.yaml", "resnet-cpu-tiny.yaml", "lstm-cpu-tiny.yaml"} <= set(CPU)
    assert "gpt-1b-zero3.yaml" in GPU


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ALL)
def test_config_validates(name):
    """Every key the YAML file sets resolves to the value written there (no validator, preset or
    default silently replaces it), under the name the file uses (aliases included)."""
    raw = _leaves(yaml.safe_load((CONFIGS / name).read_text()))
    resolved = _leaves(load_config(CONFIGS / name).model_dump(mode="json", by_alias=True))
    assert raw, f"{name} sets no keys"
    missing = sorted(k for k in raw if k not in resolved)
    assert not missing, f"{name}: keys of the file absent from the resolved config: {missing}"
    differ = {k: (v, resolved[k]) for k, v in raw.items() if resolved[k] != v}
    assert not differ, f"{name}: key: (file, resolved) {differ}"


@pytest.mark.parametrize("name", CPU)
def test_cpu_config_runs_two_steps(in_workdir, tmp_path, name):
    cfg = load_config(
        CONFIGS / name,
        [f"run.dir={tmp_path / 'run'}", "train.steps=2", "train.log_every=1", "checkpoint.at_end=false"],
    )
    summary = run(cfg)
    assert summary["status"] == "completed" and summary["step"] == 2
    # the loss, or each part's (a GAN's generator and discriminator)
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses = {r["step"]: [v for k, v in r.items() if k == "loss" or k.startswith("loss_")] for r in recs}
    assert (
        sorted(losses) == [1, 2] and all(v > 0 for vs in losses.values() for v in vs) and all(losses.values())
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("name", GPU)
def test_gpu_config_validates_and_is_refused_without_gpu(name):
    cfg = load_config(CONFIGS / name)
    with pytest.raises(TopologyError, match="run.device=cuda but no CUDA GPU is visible.*set run.device=cpu"):
        check_device(cfg)
    # with the device overridden the GPU recipe resolves to a CPU-compatible check (bf16 is fine on CPU)
    assert check_device(load_config(CONFIGS / name, ["run.device=cpu"])) == "cpu"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.precision=fp16"], "parallel.precision=fp16 runs on CUDA only"),
        (["parallel.backend=nccl"], "parallel.backend=nccl needs CUDA GPUs"),
        (
            ["parallel.zero_stage=2", "parallel.offload_optimizer=true"],
            "offload_optimizer/offload_params move state from GPU",
        ),
    ],
)
def test_cpu_refuses_gpu_only_combinations(overrides, message):
    with pytest.raises(TopologyError, match=message):
        check_device(load_config(CONFIGS / "gpt-cpu-tiny.yaml", overrides))
