"""parallel.compile: a compiled model trains as the eager one does, resumes exactly, and every file
it writes (checkpoints, exports) is the eager module's, with no ``_orig_mod.`` anywhere."""

from __future__ import annotations

import shutil

import pytest
import torch

from distrain.config import load_config
from distrain.export import export
from distrain.train import run, setup
from tests.conftest import CONFIGS, read_jsonl

CASES = {  # model: (config, overrides keeping a step short and the first steps smooth, export format)
    "gpt": ("gpt-cpu-tiny.yaml", [], "hf"),
    "lstm": ("lstm-cpu-tiny.yaml", ["model.d_hidden=128", "model.d_embed=64"], "safetensors"),
    "resnet": ("resnet-cpu-tiny.yaml", ["train.micro_batch_size=16", "optim.lr=1e-4"], "torchvision"),
}

DRIFT = {"resnet": 5e-2}  # the relative loss gap allowed after 4 steps
# ResNet's compiled and eager gradients agree to about 1e-5, but most are below 1e-7, near Adam's
# eps, and Adam's first updates (nearly sign(g)) then differ by about 0.2%; BatchNorm's batch
# statistics amplify that by an amount that depends on the batches and grows with the learning
# rate: a small one keeps the comparison about compilation, not about that amplification.


def _cfg(tmp_path, model: str, name: str, *over: str):
    config, small, _ = CASES[model]
    return load_config(
        CONFIGS / config,
        [
            f"run.dir={tmp_path / name}",
            "train.steps=8",
            "train.log_every=1",
            "train.eval_every=0",
            "optim.warmup_steps=2",
            "checkpoint.every_steps=4",
            "checkpoint.at_end=false",
            "tracking.progress_bar=false",
            *small,
            *over,
        ],
    )


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _files_mention(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize(
    "model",
    ["gpt", pytest.param("lstm", marks=pytest.mark.slow), pytest.param("resnet", marks=pytest.mark.slow)],
)
def test_compiled_model_trains_resumes_and_exports_as_the_eager_one(in_workdir, tmp_path, model):
    eager_cfg = _cfg(tmp_path, model, "eager")
    run(eager_cfg)
    cfg = _cfg(tmp_path, model, "compiled", "parallel.compile=true")
    s = setup(cfg)
    assert s.engine.is_compiled
    run(cfg, s)
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(compiled) == 8
    # inductor fuses and reorders float arithmetic: the same run up to rounding, which BatchNorm's
    # batch statistics amplify step after step (the first steps agree as closely as the others')
    drift = DRIFT.get(model, 2e-3)
    assert compiled[:4] == pytest.approx(eager[:4], rel=2e-3), (eager, compiled)
    assert compiled == pytest.approx(eager, rel=drift), (eager, compiled)

    # the module DeepSpeed holds and saves is the eager one, with its own parameter names
    names = [n for n, _ in s.engine.module.named_parameters()]
    assert names and not any("_orig_mod" in n for n in names)
    ckpt = tmp_path / "compiled" / "checkpoints" / "step00000004"
    sd = torch.load(ckpt / "model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
        "module"
    ]
    assert sorted(sd) == sorted(s.engine.module.state_dict())

    # resume from step 4, compiled: steps 5-8 as the uninterrupted compiled run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    (resumed / "checkpoints" / "latest").write_text(ckpt.name)
    rcfg = _cfg(tmp_path, model, "resumed", "parallel.compile=true", "checkpoint.resume=true")
    rs = setup(rcfg)
    assert rs.trainer.step == 4
    run(rcfg, rs)
    assert _losses(resumed)[-4:] == pytest.approx(compiled[4:], rel=1e-5)
    # and a compiled run's checkpoint resumes eagerly (parallel.compile may change on resume)
    eager_resume = tmp_path / "eager-resume"
    shutil.copytree(
        resumed / "checkpoints", eager_resume / "checkpoints", ignore=shutil.ignore_patterns("step00000008")
    )
    (eager_resume / "checkpoints" / "latest").write_text(ckpt.name)
    ecfg = _cfg(tmp_path, model, "eager-resume", "checkpoint.resume=true")
    run(ecfg)
    assert _losses(eager_resume)[-4:] == pytest.approx(compiled[4:], rel=drift)

    fmt = CASES[model][2]
    out = export(tmp_path / "compiled", fmt, tmp_path / "export")
    ref = export(tmp_path / "eager", fmt, tmp_path / "export-eager")
    assert out.exists() and ref.exists()
    assert not _files_mention(tmp_path, b"_orig_mod"), "a compiled run wrote a compile wrapper's names"
    if fmt == "torchvision":
        a, b = torch.load(out, weights_only=True), torch.load(ref, weights_only=True)
        assert sorted(a) == sorted(b)


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_naming_the_key(tmp_path, monkeypatch):
    from distrain.errors import TopologyError
    from distrain.parallel import check_device

    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [f"run.dir={tmp_path}", "parallel.compile=true"])
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ or clang++ on it
    with pytest.raises(TopologyError, match="parallel.compile=true on the CPU needs a C\\+\\+ compiler"):
        check_device(cfg)
    monkeypatch.undo()
    assert check_device(cfg) == "cpu"


@pytest.mark.slow  # about 80 s: ZeRO 3's hooks around a compiled module
def test_compiled_gpt_under_zero3_trains_as_the_eager_one(in_workdir, tmp_path):
    for name, over in (("eager", []), ("compiled", ["parallel.compile=true"])):
        run(_cfg(tmp_path, "gpt", name, "parallel.zero_stage=3", *over))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=2e-3)
    assert not _files_mention(tmp_path / "compiled", b"_orig_mod")
