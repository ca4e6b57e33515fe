"""A run's end is always recorded, and `distrain status` tells it truthfully: running, completed,
failed (with the step, the error and its type, on any rank), preempted, and stopped (killed without
warning: the time of its last heartbeat), for `distrain train` and torchrun runs (Ray's are in
tests/test_ray_train.py, Slurm's in tests/test_slurm.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CONFIGS, cli, wait_for_records, write_corpus
from tests.test_multiprocess import torchrun_cmd

TINY = CONFIGS / "gpt-cpu-tiny.yaml"
FAIL = ["data.on_error=fail", "data.shuffle=false", "data.eval_path=null", "train.log_every=1"]


def kill_job(proc: subprocess.Popen) -> None:
    """kill -9 of a job this test started: its process and every process under it (torchrun starts
    its ranks in sessions of their own; a Ray driver, the workers of its local cluster)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    for p in procs:  # gone, or a zombie that its parent (now init) has yet to reap
        while p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)


def _status(run_dir) -> dict:
    out = cli("status", run_dir, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def test_train_runs_are_told_running_stopped_preempted_and_failed(in_workdir, tmp_path):
    train = [
        sys.executable,
        "-m",
        "distrain.cli",
        "train",
        str(TINY),
        "train.log_every=1",
        "train.eval_every=0",
    ]
    # running, then killed without warning: stopped, with its last heartbeat and step
    run_dir = tmp_path / "killed"
    proc = _start([*train, f"run.dir={run_dir}", "train.steps=1000000"])
    try:
        wait_for_records(run_dir / "metrics.jsonl", 3, proc)
        st = _status(run_dir)
        assert st["state"] == "running" and st["step"] >= 3 and st["heartbeat"] is not None
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "summary.json").exists()
    st = _status(run_dir)
    assert st["state"] == "stopped" and st["step"] >= 3 and "without a record" in st["reason"]
    hb = json.loads((run_dir / "heartbeat.json").read_text())
    assert st["heartbeat"] == hb["time"] and hb["pid"] == proc.pid and hb["step"] == st["step"]
    assert "heartbeat" in cli("status", run_dir).stdout
    # a scheduler's SIGTERM: checkpointed, exit 75, preempted; resumed, it is running again
    run_dir = tmp_path / "preempted"
    proc = _start([*train, f"run.dir={run_dir}", "train.steps=1000000"])
    try:
        wait_for_records(run_dir / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75
    st = _status(run_dir)
    assert st["state"] == "preempted" and st["checkpoint"] == f"step{st['step']:08d}"
    # a failure at a step (a malformed row, data.on_error=fail): failed, the step, the error, its type
    run_dir = tmp_path / "failed"
    corpus = write_corpus(tmp_path / "bad", bad=(3, 15))
    out = cli("train", TINY, f"run.dir={run_dir}", f"data.train_path={corpus}", "train.steps=30", *FAIL)
    assert out.returncode == 1 and "train-00003.jsonl line 16: malformed JSON" in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_type"] == "DataError" and summary["rank"] == 0
    assert 0 < summary["step"] < 30 and "train-00003.jsonl line 16: malformed JSON" in summary["error"]
    st = _status(run_dir)
    assert (st["state"], st["step"], st["error"]) == ("failed", summary["step"], summary["error"])
    assert st["error_type"] == "DataError"


@pytest.mark.world_size
def test_torchrun_a_failure_on_rank_1_is_recorded_and_a_killed_job_is_stopped(in_workdir, tmp_path):
    corpus = write_corpus(tmp_path / "bad", bad=(3, 15))  # partition 3 of 4: rank 1's
    run_dir = tmp_path / "failed"
    args = ["-m", "distrain.cli", "train", str(TINY), "cluster.workers=2", "train.eval_every=0"]
    p = subprocess.run(
        torchrun_cmd(*args, f"run.dir={run_dir}", f"data.train_path={corpus}", "train.steps=30", *FAIL),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    # rank 1's error, not rank 0's broken connection to it
    assert summary["status"] == "failed" and summary["rank"] == 1 and summary["error_type"] == "DataError"
    assert "train-00003.jsonl line 16: malformed JSON" in summary["error"] and 0 < summary["step"] < 30
    st = _status(run_dir)
    assert (st["state"], st["error"]) == ("failed", summary["error"])
    # kill -9 of the whole job (torchrun and both ranks): stopped
    run_dir = tmp_path / "killed"
    proc = _start(torchrun_cmd(*args, f"run.dir={run_dir}", "train.steps=1000000", "train.log_every=1"))
    try:
        wait_for_records(run_dir / "metrics.jsonl", 3, proc)
        assert _status(run_dir)["state"] == "running"
    finally:
        kill_job(proc)
    st = _status(run_dir)
    assert st["state"] == "stopped" and st["step"] >= 3 and st["heartbeat"] is not None
