"""The GAN and the VAE on several ranks: torchrun and Ray with 2 workers, ZeRO 0-3, replicas
identical, a resume on another world size (the universal conversion of every part), an elastic
resize (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, REPO, cli, read_jsonl, wandb_history

GAN, VAE = CONFIGS / "gan-cpu-tiny.yaml", CONFIGS / "vae-cpu-tiny.yaml"
COMMON = [
    "train.log_every=1",
    "train.eval_every=3",
    "train.micro_batch_size=16",
    "train.check_replicas=true",
    "metrics.peak_tflops=1",
    "tracking.wandb.mode=disabled",
    "tracking.progress_bar=false",
]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every part's consolidated fp32 weights of the newest checkpoint."""
    from distrain.checkpoint import engine_dir, newest_valid
    from distrain.export import consolidated_state_dict

    ckpt, manifest = newest_valid(run_dir / "checkpoints")
    out = {}
    for part in manifest["parts"]:
        where, tag = engine_dir(ckpt, part)
        out.update(
            {
                f"{part}.{k}": v
                for k, v in consolidated_state_dict(where / tag, manifest["zero_stage"]).items()
            }
        )
    return out


def _gan_two_ranks(run_dir: Path, *overrides: str, **kw):
    """The GAN for 6 steps on 2 ranks under torchrun."""
    return cli(
        "train",
        GAN,
        f"run.dir={run_dir}",
        "cluster.workers=2",
        *COMMON,
        "train.steps=6",
        *overrides,
        ranks=2,
        **kw,
    )


@pytest.fixture(scope="module")
def gan_zero0(workdir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gan0") / "run"
    p = _gan_two_ranks(run_dir, "optim.fused=false", cwd=workdir)
    assert p.returncode == 0, p.stderr[-5000:]
    return run_dir


@pytest.mark.world_size
@pytest.mark.parametrize("stage", [2, 3])
def test_gan_on_two_ranks_matches_zero0_at_zero_2_and_3_replicas_identical(
    in_workdir, tmp_path, gan_zero0, stage
):
    """Two ranks, each drawing its own latents: ZeRO 2 and 3 train both parts as ZeRO 0 does (DDP,
    with the same torch AdamW: the fused kernel's last bits differ and GAN training amplifies them),
    to float summation; every rank ends with the same parameters; one rank logs."""
    run_dir = tmp_path / "run"
    p = _gan_two_ranks(run_dir, f"parallel.zero_stage={stage}")
    assert p.returncode == 0, p.stderr[-5000:]
    for d in (gan_zero0, run_dir):
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "completed" and s["world_size"] == 2 and s["replicas_identical"] is True
    a, b = _weights(gan_zero0), _weights(run_dir)
    assert set(a) == set(b) and any(k.startswith("generator.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    assert (p.stdout + p.stderr).count("step 6/6 |") == 1


@pytest.mark.world_size
def test_gan_resumes_on_one_process_from_two_ranks_through_universal_checkpoints(
    in_workdir, tmp_path, gan_zero0
):
    """A 2-rank ZeRO 1 checkpoint of both parts, resumed by one process: each part converted to
    DeepSpeed's universal format and loaded; the run goes on to its end."""
    run_dir = tmp_path / "run"
    p = cli(
        "train",
        GAN,
        f"run.dir={run_dir}",
        "cluster.workers=2",
        *COMMON,
        "train.steps=4",
        "parallel.zero_stage=1",
        ranks=2,
    )
    assert p.returncode == 0, p.stderr[-5000:]
    p = cli(
        "train",
        GAN,
        f"run.dir={run_dir}",
        *COMMON,
        "train.steps=8",
        "parallel.zero_stage=1",
        "parallel.grad_accum=2",
    )
    assert p.returncode == 0, p.stderr[-5000:]
    assert (
        "step00000004 was saved by 2 workers and this run has 1: converting it to a universal checkpoint"
        in p.stderr
    )
    uni = run_dir / "checkpoints" / "step00000004-universal"
    assert (uni / "generator" / "zero").is_dir() and (uni / "discriminator" / "zero").is_dir()
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss_generator" in r] == list(range(1, 9))
    assert [r["world_size"] for r in recs if "loss_generator" in r] == [2] * 4 + [1] * 4


@pytest.mark.world_size
def test_vae_on_two_ranks_zero2_replicas_identical_and_elbo_falls(in_workdir, tmp_path):
    run_dir = tmp_path / "run"
    p = cli(
        "train",
        VAE,
        f"run.dir={run_dir}",
        "cluster.workers=2",
        *COMMON,
        "train.steps=30",
        "train.eval_every=10",
        "parallel.zero_stage=2",
        ranks=2,
    )
    assert p.returncode == 0, p.stderr[-5000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["replicas_identical"] is True
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        f"step{n:08d}.png" for n in (10, 20, 30)
    ]


@pytest.mark.ray
@pytest.mark.world_size
def test_gan_on_two_ray_workers_replicas_identical_with_wandb(in_workdir, tmp_path, ray_env):
    """Ray Train runs the two engines on two workers: both parts' losses and the sample grids in
    metrics.jsonl and the W&B run (offline), the grids as W&B images."""
    run_dir = tmp_path / "run"
    over = [o for o in COMMON if not o.startswith("tracking.wandb")]
    p = cli(
        "launch",
        "local",
        GAN,
        "--workers",
        "2",
        f"run.dir={run_dir}",
        *over,
        "train.steps=6",
        "tracking.wandb.mode=offline",
        env=ray_env,
    )
    assert p.returncode == 0, p.stderr[-5000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["replicas_identical"] is True
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(log)
    images = [r for r in rows if "samples/_type" in r]
    assert [r["step"] for r in images] == [3, 6]
    assert all(r["samples/_type"] == "image-file" and r["samples/format"] == "png" for r in images)
    losses = [r for r in rows if "loss_generator" in r]
    assert len(losses) == 6 and all(r["loss_discriminator"] > 0 for r in losses)
    media = list(log.parent.glob("files/media/images/samples_*.png"))
    assert len(media) == 2


@pytest.mark.ray
@pytest.mark.world_size
@pytest.mark.slow
def test_gan_elastic_job_shrinks_and_grows_converting_both_parts(tmp_path):
    """The elastic drill with the GAN under ZeRO 2: two workers, one node stopped, then back; each
    resize saves both parts, converts each to a universal checkpoint and goes on."""
    steps, out = 1500, tmp_path / "drill.json"  # ~10 steps/s: the resizes take a minute or two
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_elastic.py"),
            "--config",
            str(GAN),
            "--steps",
            str(steps),
            "--out",
            str(tmp_path / "el"),
            "--json",
            str(out),
            "parallel.zero_stage=2",
            "train.eval_every=0",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    res = json.loads(out.read_text())
    run_dir = Path(res["run_dir"])
    assert res["rc"] == 0, (tmp_path / "el" / "launch.log").read_text()[-5000:]
    assert res["shrink_lost_steps"] == 0 and res["grow_lost_steps"] == 0
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss_generator" in r]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    sizes = [r["world_size"] for r in recs]
    assert [(a, b) for a, b in zip(sizes, sizes[1:], strict=False) if a != b] == [(2, 1), (1, 2)]
    log = (tmp_path / "el" / "launch.log").read_text()
    assert len(set(re.findall(r"(step\d+) was saved by (\d+) workers and this run has (\d+)", log))) == 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
