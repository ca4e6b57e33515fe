"""`distrain export`: consolidated fp32 weights from any ZeRO stage, read back by the tools users use."""

from __future__ import annotations

import pytest
import torch

from distrain.config import load_config
from distrain.errors import CheckpointError, ConfigError
from distrain.train import run, setup
from tests.conftest import CONFIGS, cli


def _module_state(engine) -> dict[str, torch.Tensor]:
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def _module_logits(engine, ids) -> torch.Tensor:
    """The logits of distrain's trained module itself (its parameters gathered under ZeRO 3)."""
    import contextlib

    import deepspeed

    module = engine.module
    gather = (
        deepspeed.zero.GatheredParameters(list(module.parameters()))
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    module.eval()
    with torch.no_grad(), gather:
        return module(input_ids=ids, use_cache=False).logits.detach().float().clone()


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_hf_export_loads_in_transformers_with_the_same_logits(in_workdir, tmp_path, stage, precision):
    from transformers import AutoModelForCausalLM

    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            "train.steps=4",
            "train.eval_every=0",
            f"parallel.zero_stage={stage}",
            f"parallel.precision={precision}",
        ],
    )
    s = setup(cfg)
    run(cfg, s)
    trained = _module_state(s.engine)
    out = tmp_path / "hf"
    p = cli("export", tmp_path / "run", out, "--format", "hf")
    assert p.returncode == 0, p.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    ids = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        exported = model(ids).logits
    if precision == "fp32":
        # fp32 training: the exported weights are the trained ones, bitwise, and the exported model
        # computes what distrain's own trained module computes
        assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
        torch.testing.assert_close(exported, _module_logits(s.engine, ids), rtol=0, atol=0)
    else:  # bf16 training exports the fp32 master weights; the module holds their bf16 rounding
        assert all(torch.equal(model.state_dict()[k].bfloat16().float(), trained[k]) for k in trained)
        ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        ref.load_state_dict({k: v for k, v in trained.items()}, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(exported, ref(ids).logits, rtol=0, atol=0.1)


def test_torchvision_and_safetensors_exports(in_workdir, tmp_path):
    import torchvision
    from safetensors.torch import load_file

    from distrain.export import export

    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            "train.steps=3",
            "train.micro_batch_size=8",
            "train.eval_every=0",
            "parallel.zero_stage=2",
        ],
    )
    s = setup(cfg)
    run(cfg, s)
    trained = _module_state(s.engine)
    path = export(tmp_path / "run", "torchvision", tmp_path / "tv")
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k].detach(), trained[k]) for k in params)
    st = load_file(str(export(tmp_path / "run", "safetensors", tmp_path / "st")))
    assert set(st) >= set(params) and all(torch.equal(st[k], trained[k]) for k in params)
    with pytest.raises(ConfigError, match="--format hf exports transformers models"):
        export(tmp_path / "run", "hf", tmp_path / "x")
    with pytest.raises(CheckpointError, match="step00000009 does not exist"):
        export(tmp_path / "run", "safetensors", tmp_path / "y", step=9)
