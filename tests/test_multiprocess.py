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


@pytest.mark.world_size
def test_torchrun_two_ranks_zero2_logs_once(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
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
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=30",
        "train.log_every=5",
        "parallel.zero_stage=2",
        "cluster.workers=2",
        "checkpoint.at_end=false",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]  # one writer: no duplicate records
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"]
    assert recs[0]["samples_per_s"] > 0 and (run_dir / "summary.json").exists()
    out = p.stdout + p.stderr
    assert out.count("step 30/30 |") == 1 and "world size 2" in out  # rank 0 logs, rank 1 does not
    assert "[rank 1]" not in out  # no warnings or errors from rank 1
