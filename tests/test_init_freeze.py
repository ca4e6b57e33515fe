"""Transfer learning: ``model.init_from`` loads local weights before DeepSpeed wraps the model, and
``model.freeze`` keeps matching weights bitwise unchanged through training."""

from __future__ import annotations

import pytest
import torch

from distrain.config import load_config
from distrain.errors import CheckpointError, ConfigError
from distrain.models import build_model
from distrain.train import run, setup
from tests.conftest import CONFIGS


def _full_state(engine) -> dict[str, torch.Tensor]:
    """The module's weights; ZeRO-3 partitions are gathered first."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gpt_init_from_hf_dir_and_freeze(in_workdir, tmp_path, stage):
    base = load_config(CONFIGS / "gpt-cpu-tiny.yaml", ["run.seed=123"])
    donor = build_model(base)
    donor.save_pretrained(tmp_path / "donor")  # a local HF directory (model.safetensors + config.json)
    donor_sd = {k: v.clone() for k, v in donor.state_dict().items()}

    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            "train.steps=8",
            "train.eval_every=0",
            "checkpoint.at_end=false",
            f"model.init_from={tmp_path / 'donor'}",
            "model.freeze=['transformer.wte.*', 'transformer.h.0.*']",
            f"parallel.zero_stage={stage}",
        ],
    )
    s = setup(cfg)
    before = _full_state(s.engine)
    for k, v in donor_sd.items():  # the weights arrived (seed 0 would give other weights)
        assert torch.equal(before[k], v), k
    run(cfg, s)
    after = _full_state(s.engine)
    frozen = [k for k in after if k.startswith(("transformer.wte.", "transformer.h.0."))]
    trained = [k for k in after if k.startswith("transformer.h.1.") and k.endswith("weight")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(after[k], donor_sd[k]), f"frozen {k} changed"
    assert all(not torch.equal(after[k], donor_sd[k]) for k in trained)


def test_resnet_init_from_torchvision_state_dict_new_head(in_workdir, tmp_path):
    import torchvision

    torch.manual_seed(7)
    donor = torchvision.models.resnet18(num_classes=5)  # another task's head: shape differs
    torch.save(donor.state_dict(), tmp_path / "r18.pt")
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            "train.steps=4",
            "train.micro_batch_size=8",
            "train.eval_every=0",
            "checkpoint.at_end=false",
            f"model.init_from={tmp_path / 'r18.pt'}",
            "model.freeze=['conv1.*', 'layer1.*']",
        ],
    )
    s = setup(cfg)
    before = _full_state(s.engine)
    assert torch.equal(before["layer2.0.conv1.weight"], donor.state_dict()["layer2.0.conv1.weight"])
    assert before["fc.weight"].shape == (10, 512)  # the new head keeps its init
    run(cfg, s)
    after = _full_state(s.engine)
    assert torch.equal(after["conv1.weight"], donor.state_dict()["conv1.weight"])
    assert torch.equal(after["layer1.1.conv2.weight"], donor.state_dict()["layer1.1.conv2.weight"])
    assert not torch.equal(after["layer4.1.conv2.weight"], donor.state_dict()["layer4.1.conv2.weight"])


def test_init_from_safetensors_file_and_errors(in_workdir, tmp_path):
    from safetensors.torch import save_file

    cfg = load_config(CONFIGS / "lstm-cpu-tiny.yaml", ["run.seed=5"])
    donor = build_model(cfg)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    cfg2 = load_config(CONFIGS / "lstm-cpu-tiny.yaml", [f"model.init_from={tmp_path / 'w.safetensors'}"])
    got = build_model(cfg2)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in donor.state_dict().items())

    with pytest.raises(CheckpointError, match="model.init_from: .*missing.pt does not exist"):
        build_model(
            load_config(CONFIGS / "lstm-cpu-tiny.yaml", [f"model.init_from={tmp_path / 'missing.pt'}"])
        )
    torch.save({"other": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no tensor in .*other.pt matches"):
        build_model(load_config(CONFIGS / "lstm-cpu-tiny.yaml", [f"model.init_from={tmp_path / 'other.pt'}"]))
    torch.save({"w": [object]}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="not a weights-only torch state dict"):
        build_model(
            load_config(CONFIGS / "lstm-cpu-tiny.yaml", [f"model.init_from={tmp_path / 'pickle.pt'}"])
        )
    with pytest.raises(ConfigError, match=r"model.freeze: pattern 'nothing\.\*' matches no parameter"):
        build_model(load_config(CONFIGS / "lstm-cpu-tiny.yaml", ["model.freeze=['nothing.*']"]))
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        build_model(load_config(CONFIGS / "lstm-cpu-tiny.yaml", ["model.freeze=['*']"]))
