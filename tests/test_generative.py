"""Generative models: the GAN's two engines and the VAE train like every other model (one process
here; torchrun, Ray and resizes in test_generative_cluster.py), and their samples can be looked at
and scored."""

from __future__ import annotations

import pytest
import torch

from distrain.config import load_config
from distrain.models import build_parts, get_spec
from distrain.train import run, setup
from tests.conftest import CONFIGS, read_jsonl

GAN, VAE = CONFIGS / "gan-cpu-tiny.yaml", CONFIGS / "vae-cpu-tiny.yaml"


def _cfg(path, run_dir, *over: str):
    return load_config(
        path,
        [
            f"run.dir={run_dir}",
            "tracking.wandb.mode=disabled",
            "tracking.progress_bar=false",
            "metrics.peak_tflops=1",  # no probe: nothing but training draws from torch's stream
            *over,
        ],
    )


def _state(engines) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{n}": t.detach().clone() for k, e in engines.items() for n, t in e.module.state_dict().items()
    }


def _plain_loop(cfg, steps: int) -> dict[str, torch.Tensor]:
    """The model's step in plain PyTorch: the parts built as distrain builds them, one AdamW each
    (the part's lr and betas), the updates in turn over the same micro-batches, the part not being
    updated frozen, gradients averaged over grad_accum micro-batches."""
    from distrain.data import DataPipeline
    from distrain.parallel.engine import param_groups

    spec = get_spec(cfg.model.name)
    parts = build_parts(cfg)
    torch.manual_seed(cfg.run.seed)  # rank 0's stream, as distrain seeds it after the build
    opts = {}
    for k, m in parts.items():
        o = cfg.for_part(k).optim
        opts[k] = torch.optim.AdamW(
            param_groups(m, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True
        )
    data = DataPipeline(cfg, 0, 1, pin_memory=False)
    it = iter(data.train_batches())
    accum = cfg.parallel.grad_accum
    state = spec.state(cfg) if spec.state else None
    for _ in range(steps):
        raws = [next(it) for _ in range(accum)]
        for u in spec.steps(cfg):
            for k, m in parts.items():
                m.requires_grad_(k == u.part)
            for raw in raws:
                (u.loss(parts, {"images": raw["images"], "labels": raw["labels"]}, state) / accum).backward()
            opts[u.part].step()
            opts[u.part].zero_grad(set_to_none=True)
        if state is not None:
            state.after_step()
    data.close()
    return {f"{k}.{n}": t.detach() for k, m in parts.items() for n, t in m.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gan_steps_match_a_plain_two_optimizer_loop_with_grad_accum(in_workdir, tmp_path, stage):
    """Each engine steps its own part with its own optimizer and lr; with gradient accumulation no
    gradient of one update leaks into the other part (a leak would change the next step of that
    part and the weights would part from the plain loop's)."""
    cfg = _cfg(
        GAN,
        tmp_path / "run",
        "train.steps=4",
        "train.micro_batch_size=16",
        "parallel.grad_accum=2",
        "train.eval_every=0",
        "checkpoint.at_end=false",
        f"parallel.zero_stage={stage}",
    )
    s = setup(cfg)
    assert set(s.engines) == {"generator", "discriminator"}
    lrs = {k: e.optimizer.param_groups[0]["lr"] for k, e in s.engines.items()}
    assert lrs == {"generator": 5.0e-4, "discriminator": 2.0e-4}  # optim.<part>.lr over optim.lr
    run(cfg, s)
    got, want = _state(s.engines), _plain_loop(cfg, 4)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-6, msg=k)
    start = build_parts(cfg)
    moved = [
        k
        for k, m in start.items()
        if not all(torch.equal(t, got[f"{k}.{n}"]) for n, t in m.state_dict().items())
    ]
    assert sorted(moved) == ["discriminator", "generator"]  # both parts trained


def test_a_one_part_model_trains_through_the_same_updates(in_workdir, tmp_path):
    """A one-part model is the general case with one entry: its one update is its loss."""
    spec = get_spec("gpt")
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [f"run.dir={tmp_path}"])
    (update,) = spec.steps(cfg)
    assert update.part == "model" and spec.parts == ("model",)


@pytest.mark.parametrize("path", [GAN, VAE], ids=["gan", "vae"])
def test_resume_matches_an_uninterrupted_run_bitwise(in_workdir, tmp_path, path):
    """10 + 10 steps against 20: every part's weights and optimizer, the data position, the
    latents' random stream and (VAE) the KL warm-up continue exactly; the grids are the same."""
    over = ["train.steps=20", "train.log_every=1", "train.eval_every=10", "train.check_replicas=true"]
    ref = run(_cfg(path, tmp_path / "ref", *over))
    first = run(_cfg(path, tmp_path / "run", *over, "train.steps=10"))
    assert first["step"] == 10
    second = run(_cfg(path, tmp_path / "run", *over))
    assert second["params_sha256"] == ref["params_sha256"]
    strip = (
        "time",
        "elapsed_s",
        "samples_per_s",
        "data_wait",
        "step_time",
        "fwd_bwd",
        "optim_s",
        "eval_s",
        "power",
        "energy",
        "j_per",
        "co2",
        "mfu",
        "hfu",
        "tflops",
        "checkpoint_s",
    )
    a = [
        {k: v for k, v in r.items() if not k.startswith(strip)}
        for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    ]
    b = [
        {k: v for k, v in r.items() if not k.startswith(strip)}
        for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
    ]
    assert a == b and len(a) == 20
    grid = "samples/step00000020.png"
    assert (tmp_path / "ref" / grid).read_bytes() == (tmp_path / "run" / grid).read_bytes()
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "step00000020" / "distrain-state.pt", weights_only=True
    )
    if path == VAE:  # the warm-up is saved with the run: 20 steps of 50, weight 0.4
        assert ckpt["model_state"] == {"steps": 20, "weight": pytest.approx(0.4)}
    else:
        parts = sorted(
            p.name for p in (tmp_path / "run" / "checkpoints" / "step00000020").iterdir() if p.is_dir()
        )
        assert parts == ["discriminator", "generator"]


def test_gan_flops_per_part_match_flopcountermode(in_workdir, tmp_path):
    """The analytic FLOPs of a training step (both updates) against FlopCounterMode counting a real
    one, in total within 3% and for each part's forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from distrain.models.gan import layer_flops

    for over in (["model.width=16", "model.in_channels=1"], ["model.image_size=64", "model.latent_dim=64"]):
        cfg = load_config(GAN, [f"run.dir={tmp_path}", *over])
        spec, parts = get_spec("gan"), build_parts(cfg)
        m, n = cfg.model, 4
        batch = {"images": torch.randn(n, m.in_channels, m.image_size, m.image_size)}
        with FlopCounterMode(display=False) as fc:
            for u in spec.steps(cfg):
                for k, mod in parts.items():
                    mod.requires_grad_(k == u.part)
                u.loss(parts, batch, None).backward()
        analytic = spec.flops_by_part(cfg)
        assert sum(analytic.values()) == pytest.approx(fc.get_total_flops() / n, rel=0.03)
        for part, shape in (
            ("generator", (m.latent_dim, 1, 1)),
            ("discriminator", (m.in_channels, m.image_size, m.image_size)),
        ):
            with FlopCounterMode(display=False) as f1, torch.no_grad():
                parts[part](
                    torch.randn(n, *shape).reshape(n, -1) if part == "generator" else torch.randn(n, *shape)
                )
            assert sum(layer_flops(parts[part], shape)) == pytest.approx(f1.get_total_flops() / n, rel=0.03)


def test_vae_flops_match_flopcountermode(in_workdir, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(VAE, [f"run.dir={tmp_path}"])
    spec, parts = get_spec("vae"), build_parts(cfg)
    (u,) = spec.steps(cfg)
    batch = {"images": torch.randn(4, 1, 32, 32)}
    with FlopCounterMode(display=False) as fc:
        u.loss(parts, batch, spec.state(cfg)).backward()
    assert spec.flops_per_sample(cfg) == pytest.approx(fc.get_total_flops() / 4, rel=0.03)


def test_gan_plan_counts_both_engines(in_workdir):
    from distrain.plan import format_plan, plan

    cfg = load_config(GAN)
    p = plan(cfg, 8)
    parts = build_parts(cfg)
    n = {k: sum(t.numel() for t in m.parameters()) for k, m in parts.items()}
    assert p["part_params"] == n and p["params"] == sum(n.values())
    # both engines' weights (fp32) and Adam moments, ZeRO 0
    assert p["per_gpu_bytes"]["weights"] == 4 * sum(n.values())
    assert p["per_gpu_bytes"]["optimizer"] == 8 * sum(n.values())
    assert p["per_gpu_bytes"]["gradients_in_backward"] == 4 * max(n.values())  # one update at a time
    text = format_plan(p)
    assert "parts: generator" in text and "discriminator" in text


def test_config_refuses_unknown_parts_and_init_from(in_workdir):
    from distrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key 'optim.genrator'.*did you mean 'optim.generator'"):
        load_config(GAN, ["optim.genrator.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim.model'"):
        load_config(CONFIGS / "gpt-cpu-tiny.yaml", ["optim.model.lr=1e-4"])
    import yaml

    text = yaml.safe_load((CONFIGS / "gpt-cpu-tiny.yaml").read_text())
    text["optim"]["model"] = {"lr": 1e-4}
    with pytest.raises(
        ConfigError, match=r"unknown key 'optim.model': model.name=gpt has one part, set by optim"
    ):
        from distrain.config import config_from_yaml

        config_from_yaml(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(CONFIGS / "gpt-cpu-tiny.yaml", ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"model.init_from and model.freeze apply to a one-part model"):
        load_config(GAN, ["model.init_from=x.pt"])
    cfg = load_config(GAN, ["optim.generator.grad_clip=0.5", "optim.generator.name=adam"])
    g = cfg.for_part("generator")
    assert g.parallel.grad_clip == 0.5 and g.optim.name == "adam" and g.optim.lr == 5.0e-4
    assert cfg.for_part("discriminator").parallel.grad_clip == 0.0
    from distrain.config import config_from_yaml, to_yaml

    assert config_from_yaml(to_yaml(cfg)).for_part("generator").parallel.grad_clip == 0.5


NAN_IN_DISCRIMINATOR = """
import dataclasses
import sys
from typing import Literal

from pydantic import Field

from distrain import models
from distrain.config import load_config
from distrain.models import Update, gan
from distrain.train import run


class NanGANConfig(gan.GANModelConfig):
    name: Literal["nangan"] = Field("nangan", description="gan, its discriminator's loss NaN at steps 3 to 5.")


calls = [0]


def updates(cfg):
    d, g = gan.updates(cfg)

    def poisoned(parts, batch, state):  # the discriminator's loss is NaN at steps 3 to 5
        calls[0] += 1
        out = d.loss(parts, batch, state)
        return out * float("nan") if 3 <= calls[0] <= 5 else out

    return (Update("discriminator", poisoned), g)


models.register(dataclasses.replace(gan.SPEC, name="nangan", config=NanGANConfig, updates=updates))
run(load_config(sys.argv[1], [*sys.argv[2:], "model.name=nangan"]))
"""


def test_a_nonfinite_discriminator_update_is_skipped_and_stops_naming_it(in_workdir, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "nan.py"
    script.write_text(NAN_IN_DISCRIMINATOR)
    run_dir = tmp_path / "r"
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            str(GAN),
            f"run.dir={run_dir}",
            "train.steps=10",
            "train.log_every=1",
            "train.eval_every=0",
            "checkpoint.at_end=false",
            "tracking.wandb.mode=disabled",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode != 0
    assert "3 consecutive steps up to step 5 were skipped (non-finite loss on rank(s) [0])" in p.stderr, (
        p.stderr[-3000:]
    )
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in recs] == [0, 0, 1, 2]
    assert [r["loss_discriminator"] is None for r in recs] == [False, False, True, True]
    assert all(r["loss_generator"] is not None for r in recs)  # the generator's update went on


def test_gan_checkpoints_keep_the_newest_and_fall_back_past_a_corrupt_part(in_workdir, tmp_path):
    """Retention counts whole checkpoints (every part's shards); a damaged generator shard in the
    newest makes the resume fall back to the one before, which verifies."""
    from distrain.checkpoint import list_checkpoints

    over = ["train.steps=6", "train.eval_every=0", "checkpoint.every_steps=2", "checkpoint.keep_last=2"]
    run(_cfg(GAN, tmp_path / "run", *over))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step00000006", "step00000004"]
    shard = root / "step00000006" / "generator" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:-100])
    s = setup(_cfg(GAN, tmp_path / "run", *over, "train.steps=8"))
    assert s.trainer.step == 4  # the newest that verifies
    summary = run(s.cfg, s)
    assert summary["status"] == "completed" and summary["step"] == 8


def test_gan_records_count_flops_mfu_and_energy_for_both_parts(in_workdir, tmp_path):
    cfg = _cfg(GAN, tmp_path / "run", "train.steps=4", "train.eval_every=0", "train.log_every=2")
    run(cfg)
    flops = sum(get_spec("gan").flops_by_part(cfg).values())
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    last = recs[-1]
    assert last["flops_total"] == pytest.approx(flops * last["samples_total"])
    assert len(recs) >= 2 and all(r["mfu"] > 0 and r["energy_j"] > 0 for r in recs)
