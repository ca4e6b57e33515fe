"""Config errors name the key, where it came from and the fix; precedence is CLI > YAML > defaults."""

from __future__ import annotations

import re

import pytest
import yaml

from distrain.config import ConfigError, load_config, reference_markdown
from tests.conftest import CONFIGS, cli

GPT = CONFIGS / "gpt-cpu-tiny.yaml"


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_cli_over_yaml_over_defaults():
    cfg = load_config(GPT, ["optim.lr=0.5", "parallel.zero_stage=3"])
    assert cfg.optim.lr == 0.5  # CLI beats the YAML's 3e-3
    assert cfg.parallel.zero_stage == 3
    assert cfg.train.steps == 100  # YAML beats the default
    assert cfg.run.seed == 0  # default
    assert cfg.optim.betas == (0.9, 0.95)


def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    p = _write(tmp_path, "model: {name: gpt, n_layers: 2}\ndata: {train_path: x, seqlen: 4}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "unknown key 'model.n_layers'" in msg and "did you mean 'model.n_layer'" in msg
    assert "unknown key 'data.seqlen'" in msg and "did you mean 'data.seq_len'" in msg
    assert str(p) in msg


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match=r"bad override 'trian.steps=3'.*did you mean 'train'"):
        load_config(GPT, ["trian.steps=3"])
    with pytest.raises(ConfigError, match=r"bad override 'optim.learning_rate=1'.*valid keys: .*lr"):
        load_config(GPT, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"'model.n_heads=2'.*did you mean 'model.n_head'"):
        load_config(GPT, ["model.n_heads=2"])


@pytest.mark.parametrize("arg", ["steps=3", "train.steps", "=3", "train..steps=1"])
def test_malformed_override_names_the_argument(arg):
    with pytest.raises(ConfigError, match=rf"bad override '{arg.replace('.', '[.]')}'"):
        load_config(GPT, [arg])


@pytest.mark.parametrize(
    "arg, key, allowed",
    [
        ("optim.lr=-1", "optim.lr", "greater than 0"),
        ("parallel.zero_stage=5", "parallel.zero_stage", "0, 1, 2 or 3"),
        ("parallel.precision=fp8", "parallel.precision", "'fp32', 'bf16' or 'fp16'"),
        ("train.steps=many", "train.steps", "valid integer"),
        ("model.dropout=1.5", "model.dropout", "less than 1"),
    ],
)
def test_bad_value_names_key_value_and_allowed(arg, key, allowed):
    with pytest.raises(ConfigError) as ei:
        load_config(GPT, [arg])
    msg = str(ei.value)
    value = arg.split("=", 1)[1]
    assert f"key '{key}' = " in msg and value in msg and allowed in msg
    assert f"command-line argument '{key}=" in msg


def test_bad_value_in_file_names_file(tmp_path):
    p = _write(tmp_path, "model: {name: gpt}\ndata: {train_path: x}\ntrain: {micro_batch_size: 0}\n")
    with pytest.raises(
        ConfigError, match=rf"key 'train.micro_batch_size' = 0 in {p}.*greater than or equal to 1"
    ):
        load_config(p)


def test_unknown_model_and_missing_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name='vit' is not a known model.*gpt, resnet, lstm"):
        load_config(GPT, ["model.name=vit"])
    p = _write(tmp_path, "run: {name: x}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "missing required key 'model'" in str(ei.value) and "missing required key 'data'" in str(ei.value)


def test_topology_error_prints_every_factor():
    with pytest.raises(ConfigError) as ei:
        load_config(
            GPT,
            [
                "train.global_batch_size=64",
                "train.micro_batch_size=8",
                "parallel.grad_accum=2",
                "cluster.workers=3",
            ],
        )
    msg = str(ei.value)
    for part in ("train.global_batch_size=64", "micro_batch_size=8", "grad_accum=2", "world size 3", "= 48"):
        assert part in msg
    cfg = load_config(
        GPT,
        [
            "train.global_batch_size=64",
            "train.micro_batch_size=8",
            "parallel.grad_accum=2",
            "cluster.workers=4",
        ],
    )
    assert cfg.train.global_batch_size == 64


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="activation_checkpointing is not supported by model.name=lstm"):
        load_config(CONFIGS / "lstm-cpu-tiny.yaml", ["parallel.activation_checkpointing=true"])
    with pytest.raises(ConfigError, match=r"data.seq_len \(256\) exceeds model.max_seq_len \(128\)"):
        load_config(GPT, ["data.seq_len=256", "model.max_seq_len=128"])
    with pytest.raises(ConfigError, match="offload_params needs parallel.zero_stage=3"):
        load_config(GPT, ["parallel.offload_params=true", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"model.d_model \(100\) must be divisible by model.n_head \(3\)"):
        load_config(GPT, ["model.d_model=100", "model.n_head=3"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = _write(tmp_path, "model:\n  name: gpt\n  bad: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{p} line \d+"):
        load_config(p)


def test_presets_fill_dimensions_and_fields_override():
    cfg = load_config(GPT, ["model.preset=small"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model) == (12, 12, 768)
    cfg = load_config(GPT, ["model.preset=small", "model.n_layer=3"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 768


def test_config_show_and_validate_cli(tmp_path):
    out = cli("config", "show", GPT, "parallel.zero_stage=3", check=True).stdout
    shown = yaml.safe_load(out)
    assert shown["parallel"]["zero_stage"] == 3 and shown["model"]["name"] == "gpt"
    # what `show` prints is itself a valid config that resolves to the same tree
    p = tmp_path / "shown.yaml"
    p.write_text(out)
    assert load_config(p) == load_config(GPT, ["parallel.zero_stage=3"])
    ok = cli("config", "validate", GPT)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = cli("config", "validate", GPT, "optim.lr=0")
    assert bad.returncode == 1 and "optim.lr" in bad.stderr


def test_reference_documents_every_key():
    ref = reference_markdown()
    from pydantic import BaseModel

    from distrain.config import Config
    from distrain.config.schema import model_config_class, model_names

    def check(prefix: str, cls) -> None:
        for key, f in cls.model_fields.items():
            assert f.description, f"{prefix}.{key} has no description"
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                check(f"{prefix}.{f.alias or key}", f.annotation)  # nested sections list their keys
            else:
                assert f"`{prefix}.{f.alias or key}`" in ref

    for name, field in Config.model_fields.items():
        model_classes = [model_config_class(n) for n in model_names(shipped=True)]
        for cls in model_classes if name == "model" else [field.annotation]:
            check(name, cls)


def test_fused_optimizer_with_offload_is_refused_naming_both_keys():
    with pytest.raises(
        ConfigError, match=r"optim.fused=true and parallel.offload_optimizer=true.*drop optim.fused"
    ):
        load_config(GPT, ["optim.fused=true", "parallel.zero_stage=2", "parallel.offload_optimizer=true"])
    cfg = load_config(GPT, ["parallel.zero_stage=2", "parallel.offload_optimizer=true"])  # unset: fine
    assert cfg.optim.fused is None


def test_errors_name_what_the_user_wrote_and_where(in_workdir, tmp_path):
    tiny = GPT
    # a preset of another architecture names the preset and the arch, not a key the user never set
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ["model.preset=1b"])
    msg = str(err.value)
    assert "model.preset=1b is a Llama shape" in msg and "model.arch=gpt2" in msg and "n_kv_head" not in msg
    assert msg.endswith("(command-line argument 'model.preset=1b')")
    assert load_config(tiny, ["model.preset=1b", "model.arch=llama"]).model.n_kv_head == 8
    # the command line is named when an override caused the error, the file when the file did
    with pytest.raises(
        ConfigError,
        match=r"data.partitions=3 is not divisible.*\(command-line argument 'data.partitions=3'\)$",
    ):
        load_config(tiny, ["data.partitions=3", "cluster.workers=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny.read_text() + "cluster:\n  workers: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"data.partitions=3 is not divisible.*\(command-line argument 'data.partitions=3'\)$",
    ):
        load_config(bad, ["data.partitions=3"])
    bad.write_text(
        tiny.read_text().replace("seq_len: 128", "seq_len: 128\n  partitions: 3") + "cluster:\n  workers: 2\n"
    )
    with pytest.raises(ConfigError, match=rf"data.partitions=3 is not divisible.*\({re.escape(str(bad))}\)$"):
        load_config(bad)
