"""Two CPU processes over gloo under torchrun: the worker code does not care who launched it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, read_jsonl


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_port()),
        "-m",
        "distrain.cli",
        *args,
        "cluster.workers=2",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _one(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distrain.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.world_size
def test_torchrun_two_ranks_zero2_logs_once(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    p = _torchrun(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=30",
        "train.log_every=5",
        "parallel.zero_stage=2",
        "checkpoint.at_end=false",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]  # one writer: no duplicate records
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"]
    assert recs[0]["samples_per_s"] > 0 and (run_dir / "summary.json").exists()
    out = p.stdout + p.stderr
    assert out.count("step 30/30 |") == 1 and "world size 2" in out  # rank 0 logs, rank 1 does not
    assert "[rank 1]" not in out  # no warnings or errors from rank 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone created a W&B run


@pytest.mark.world_size
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_world_size(in_workdir, tmp_path, first, second):
    run_dir = tmp_path / "r"
    args = [
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "parallel.zero_stage=2",
        "train.log_every=2",
        "train.micro_batch_size=4",
    ]
    launch = {1: _one, 2: _torchrun}
    p = launch[first](*args, "train.steps=20")  # saves its checkpoint at the end
    assert p.returncode == 0, p.stderr[-4000:]
    before = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    p = launch[second](*args, "train.steps=40")
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"saved by {first} workers and this run has {second}" in p.stderr and "resumed from" in p.stderr
    after = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in after] == list(range(2, 41, 2))  # the second attempt took over at step 20
    # the loss curve continues where the first attempt left it, far below where training started
    resumed = next(r for r in after if r["step"] == 22)["loss"]
    assert before[-1]["step"] == 20
    assert resumed < before[0]["loss"] - 1.0 and resumed < before[-1]["loss"] + 0.3  # no jump back up
