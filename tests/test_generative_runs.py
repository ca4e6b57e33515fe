"""What a user of a generative model looks at, on one short CPU run of each model shared by every
test here: the sample grids, the figures of a classifier trained by distrain that say whether the
samples look like digits, the exported generator and decoder, `distrain sample` and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distrain.config import load_config
from distrain.models import build_parts, get_spec
from tests.conftest import CONFIGS, cli, cli_all, read_jsonl

GAN, VAE = CONFIGS / "gan-cpu-tiny.yaml", CONFIGS / "vae-cpu-tiny.yaml"
QUIET = ["tracking.wandb.mode=disabled", "tracking.progress_bar=false"]


@pytest.fixture(scope="session")
def scorer(workdir, tmp_path_factory) -> Path:
    """A ResNet-18 digit classifier trained by distrain on the shipped digits (greyscale)."""
    run_dir = tmp_path_factory.mktemp("scorer") / "run"
    p = cli(
        "train",
        CONFIGS / "resnet-cpu-tiny.yaml",
        f"run.dir={run_dir}",
        "model.in_channels=1",
        *QUIET,
        cwd=workdir,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())["final_eval_loss"]
    assert final < 0.6, final  # it tells the digits apart
    return run_dir


def _train(config, tmp_path_factory, workdir, scorer, name: str) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    p = cli("train", config, f"run.dir={run_dir}", f"metrics.sample_scorer={scorer}", *QUIET, cwd=workdir)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def gan_run(workdir, tmp_path_factory, scorer) -> Path:
    return _train(GAN, tmp_path_factory, workdir, scorer, "gan")


@pytest.fixture(scope="module")
def vae_run(workdir, tmp_path_factory, scorer) -> Path:
    return _train(VAE, tmp_path_factory, workdir, scorer, "vae")


def _untrained_scores(run_dir: Path, scorer: Path) -> dict[str, float]:
    """The scorer's figures for samples of the model as initialised (same latents as the run's)."""
    from distrain.data.vision import norm_stats
    from distrain.samples import SCORED, Scorer, to_pixels

    cfg = load_config(run_dir / "config.yaml")
    spec = get_spec(cfg.model.name)
    parts = build_parts(cfg)
    for m in parts.values():
        m.eval()
    z = spec.generative.latent(cfg, SCORED, torch.Generator().manual_seed(cfg.run.seed + 1))
    with torch.no_grad():
        images = spec.generative.decode(parts, z)
    return Scorer(scorer, torch.device("cpu")).score(to_pixels(images, *norm_stats(cfg)))


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_trained_samples_score_as_digits_far_above_untrained_ones(
    in_workdir, scorer, gan_run, vae_run, model
):
    """The classifier is confident about the trained model's samples and finds many digits among
    them; the untrained model's noise is one class. Margins, not exact numbers."""
    run_dir = gan_run if model == "gan" else vae_run
    scored = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "sample_confidence" in r]
    steps = load_config(run_dir / "config.yaml").train.steps
    assert scored and scored[-1]["step"] == steps
    trained, untrained = scored[-1], _untrained_scores(run_dir, scorer)
    assert trained["sample_class_entropy"] > untrained["sample_class_entropy"] + 0.7, (trained, untrained)
    assert trained["sample_confidence"] > untrained["sample_confidence"] + 0.08, (trained, untrained)
    assert trained["sample_class_entropy"] > 1.2  # at least ~4 digits among the samples


def test_vae_eval_elbo_and_reconstruction_error_fall(vae_run):
    evals = [r for r in read_jsonl(vae_run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"]
    assert evals[-1]["eval_recon_mse"] < evals[0]["eval_recon_mse"]
    assert all(r["eval_kl"] > 0 for r in evals)


def test_grids_every_eval_of_the_fixed_latents(gan_run, vae_run):
    """An 8-wide PNG every eval_every steps: the GAN's 64 samples; the VAE's 16 held-out images and
    their reconstructions above 64 samples from the prior."""
    from PIL import Image

    for run_dir, rows in ((gan_run, 8), (vae_run, 12)):
        cfg = load_config(run_dir / "config.yaml")
        every, steps = cfg.train.eval_every, cfg.train.steps
        grids = sorted((run_dir / "samples").glob("*.png"))
        assert [g.name for g in grids] == [f"step{s:08d}.png" for s in range(every, steps + 1, every)]
        with Image.open(grids[-1]) as im:
            assert im.format == "PNG" and im.size == (8 * 34 + 2, rows * 34 + 2)
        assert grids[0].read_bytes() != grids[-1].read_bytes()  # the model changed between them


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_export_writes_the_generator_or_decoder_as_safetensors_that_load_back(
    in_workdir, tmp_path, gan_run, vae_run, model
):
    from safetensors.torch import load_file

    from distrain.export import export_module

    run_dir = gan_run if model == "gan" else vae_run
    p = cli("export", run_dir, tmp_path / "out", "--format", "safetensors")
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = load_config(run_dir / "config.yaml")
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    module = export_module(cfg)
    module.load_state_dict(sd, strict=True)  # every key, no other
    module.eval()
    z = torch.randn(4, cfg.model.latent_dim)
    with torch.no_grad():
        images = module(z)
    assert images.shape == (4, 1, 32, 32) and images.abs().max() <= 1
    fresh = export_module(cfg).state_dict()
    assert any(not torch.equal(fresh[k], sd[k]) for k in sd if sd[k].is_floating_point())  # trained weights
    p = cli("export", run_dir, tmp_path / "hf", "--format", "hf")
    assert p.returncode == 1 and "--format hf exports transformers models" in p.stderr


def test_sample_draws_a_grid_from_a_checkpoint_and_text_for_a_language_model(in_workdir, tmp_path, gan_run):
    from PIL import Image

    out, again, lm = tmp_path / "draw.png", tmp_path / "again.png", tmp_path / "lm"
    drawn, redrawn, no_step, prompt, trained = cli_all(
        ("sample", gan_run, "--n", "16", "--step", "300", "--out", out),
        ("sample", gan_run, "--n", "16", "--step", "300", "--out", again),
        ("sample", gan_run, "--step", "7", "--out", tmp_path / "none.png"),
        ("sample", gan_run, "--prompt", "hello"),
        ("train", CONFIGS / "gpt-cpu-tiny.yaml", f"run.dir={lm}", "train.steps=2", *QUIET),
    )
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (8 * 34 + 2, 2 * 34 + 2)
    assert redrawn.returncode == 0
    assert again.read_bytes() == out.read_bytes()  # the same seed draws the same latents
    assert no_step.returncode == 1 and "step00000007 does not exist" in no_step.stderr
    assert prompt.returncode == 1 and "trains model.name=gan on images; drop --prompt" in prompt.stderr

    assert trained.returncode == 0, trained.stderr[-3000:]
    p, grid = cli_all(
        ("sample", lm, "--prompt", "def main", "--tokens", "12", "--n", "2"), ("sample", lm, "--out", out)
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("def main")
    assert grid.returncode == 1 and "draws no images; pass --prompt" in grid.stderr


def test_report_shows_the_last_grid_both_losses_and_the_scores(in_workdir, tmp_path, gan_run):
    p = cli("report", gan_run, "--out", tmp_path / "rep")
    assert p.returncode == 0, p.stderr[-3000:]
    md = (tmp_path / "rep" / "report.md").read_text()
    last = sorted((gan_run / "samples").glob("*.png"))[-1]
    assert (tmp_path / "rep" / "samples.png").read_bytes() == last.read_bytes()
    assert "![samples](samples.png)" in md and "Samples at step 300" in md
    assert "Scored by metrics.sample_scorer at step 300" in md
    assert "![loss](loss.png)" in md and (tmp_path / "rep" / "loss.png").stat().st_size > 0
    from distrain.metrics.report import _loss_keys

    keys = [k for k, _ in _loss_keys(read_jsonl(gan_run / "metrics.jsonl"))]
    assert {"loss_discriminator", "loss_generator", "eval_loss_generator"} <= set(keys)


def test_a_scorer_that_is_not_a_classifier_run_is_refused_before_anything_starts(
    in_workdir, tmp_path, gan_run
):
    run_dir = tmp_path / "r"
    *refused, p = cli_all(
        ("train", GAN, f"run.dir={run_dir}", f"metrics.sample_scorer={tmp_path / 'nowhere'}", *QUIET),
        ("train", GAN, f"run.dir={run_dir}", f"metrics.sample_scorer={gan_run}", *QUIET),
        (
            "train",
            CONFIGS / "gpt-cpu-tiny.yaml",
            f"run.dir={run_dir}",
            f"metrics.sample_scorer={gan_run}",
            *QUIET,
        ),
    )
    for p_, why in zip(
        refused,
        ("no config.yaml there", "a model.name=gan run; the scorer is an image classifier"),
        strict=True,
    ):
        assert p_.returncode == 1 and why in p_.stderr and len(p_.stderr.strip().splitlines()) == 1, p_.stderr
    assert p.returncode == 1 and "model.name=gpt generates none" in p.stderr
    assert not run_dir.exists()


def test_scoring_samples_does_not_change_training(in_workdir, tmp_path, scorer):
    """The scorer is built beside training without drawing from (or reseeding) its random streams:
    a run with metrics.sample_scorer ends with the weights of one without."""
    over = ["train.steps=12", "train.eval_every=6", "train.check_replicas=true", *QUIET]
    a, b = cli_all(
        ("train", GAN, f"run.dir={tmp_path / 'a'}", *over),
        ("train", GAN, f"run.dir={tmp_path / 'b'}", f"metrics.sample_scorer={scorer}", *over),
    )
    assert a.returncode == 0 and b.returncode == 0, b.stderr[-3000:]
    sha = [json.loads((tmp_path / d / "summary.json").read_text())["params_sha256"] for d in "ab"]
    assert sha[0] == sha[1]
