"""A run's end is always recorded, and `distrain status` tells it truthfully: running, completed,
failed (with the step, the error and its type, on any rank), preempted, and stopped (killed without
warning: the time of its last heartbeat), for `distrain train` and torchrun runs (Ray's are in
tests/test_ray_train.py, Slurm's in tests/test_slurm.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.conftest import CONFIGS, cli, cli_cmd, wait_for_records, write_corpus

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
    train = ["train", TINY, "train.log_every=1", "train.eval_every=0"]
    killed, preempted, failed = tmp_path / "killed", tmp_path / "preempted", tmp_path / "failed"
    corpus = write_corpus(tmp_path / "bad", bad=(3, 15))
    # the three runs start at once: their start-up is most of their time
    procs = {
        killed: _start(cli_cmd(*train, f"run.dir={killed}", "train.steps=1000000")),
        preempted: _start(cli_cmd(*train, f"run.dir={preempted}", "train.steps=1000000")),
        failed: _start(
            cli_cmd(*train, f"run.dir={failed}", f"data.train_path={corpus}", "train.steps=30", *FAIL)
        ),
    }
    try:
        # a scheduler's SIGTERM: checkpointed, exit 75, preempted
        proc = procs[preempted]
        wait_for_records(preempted / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        assert proc.returncode == 75
        st = _status(preempted)
        assert st["state"] == "preempted" and st["checkpoint"] == f"step{st['step']:08d}"
        # running, then killed without warning: stopped, with its last heartbeat and step
        proc = procs[killed]
        wait_for_records(killed / "metrics.jsonl", 3, proc)
        st = _status(killed)
        assert st["state"] == "running" and st["step"] >= 3 and st["heartbeat"] is not None
        proc.kill()
        proc.wait(timeout=60)
        # a failure at a step (a malformed row, data.on_error=fail): failed, the step, the error, its type
        _, err = procs[failed].communicate(timeout=600)
        assert procs[failed].returncode == 1 and "train-00003.jsonl line 16: malformed JSON" in err, err[
            -3000:
        ]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert not (killed / "summary.json").exists()
    st = _status(killed)
    assert st["state"] == "stopped" and st["step"] >= 3 and "without a record" in st["reason"]
    hb = json.loads((killed / "heartbeat.json").read_text())
    assert st["heartbeat"] == hb["time"] and hb["pid"] == procs[killed].pid and hb["step"] == st["step"]
    assert "heartbeat" in cli("status", killed).stdout
    summary = json.loads((failed / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_type"] == "DataError" and summary["rank"] == 0
    assert 0 < summary["step"] < 30 and "train-00003.jsonl line 16: malformed JSON" in summary["error"]
    st = _status(failed)
    assert (st["state"], st["step"], st["error"]) == ("failed", summary["step"], summary["error"])
    assert st["error_type"] == "DataError"


@pytest.mark.world_size
def test_torchrun_a_failure_on_rank_1_is_recorded_and_a_killed_job_is_stopped(in_workdir, tmp_path):
    corpus = write_corpus(tmp_path / "bad", bad=(3, 15))  # partition 3 of 4: rank 1's
    run_dir = tmp_path / "failed"
    args = ["train", TINY, "cluster.workers=2", "train.eval_every=0"]
    p = cli(*args, f"run.dir={run_dir}", f"data.train_path={corpus}", "train.steps=30", *FAIL, ranks=2)
    assert p.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    # rank 1's error, not rank 0's broken connection to it
    assert summary["status"] == "failed" and summary["rank"] == 1 and summary["error_type"] == "DataError"
    assert "train-00003.jsonl line 16: malformed JSON" in summary["error"] and 0 < summary["step"] < 30
    st = _status(run_dir)
    assert (st["state"], st["error"]) == ("failed", summary["error"])
    # kill -9 of the whole job (torchrun and both ranks): stopped
    run_dir = tmp_path / "killed"
    proc = _start(cli_cmd(*args, f"run.dir={run_dir}", "train.steps=1000000", "train.log_every=1", ranks=2))
    try:
        wait_for_records(run_dir / "metrics.jsonl", 3, proc)
        assert _status(run_dir)["state"] == "running"
    finally:
        kill_job(proc)
    st = _status(run_dir)
    assert st["state"] == "stopped" and st["step"] >= 3 and st["heartbeat"] is not None
