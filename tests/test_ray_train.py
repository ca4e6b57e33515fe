"""Ray Train runs the job: `distrain launch local|ray` on CPU workers over gloo, all on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    CONFIGS,
    REPO,
    cli,
    cli_all,
    cli_cmd,
    complete_steps,
    read_jsonl,
    wait_for_records,
    write_corpus,
)
from tests.test_status import kill_job

pytestmark = [pytest.mark.ray, pytest.mark.world_size]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


COMMON = ["train.steps=20", "train.log_every=1", "train.eval_every=0", "checkpoint.at_end=false"]
LAUNCH_TWO = (
    "launch",
    "local",
    CONFIGS / "gpt-cpu-tiny.yaml",
    "--workers",
    "2",
)  # the tiny GPT on 2 Ray workers


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO 2: also under torchrun
def test_two_ray_workers_match_one_process_with_the_same_global_batch(in_workdir, tmp_path, ray_env, stage):
    """Also: the workers resolve the config's relative data paths in the launch directory, the
    launching process's own, not $PWD (which `subprocess(cwd=...)` and `os.chdir` leave as it was):
    here $PWD names a directory without the data."""
    cfg = str(CONFIGS / "gpt-cpu-tiny.yaml")
    ray_dir, one_dir = tmp_path / "ray", tmp_path / "one"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stage_args = [f"parallel.zero_stage={stage}", *COMMON]
    p, p1 = cli_all(  # the one process trains while Ray starts
        (
            "launch",
            "local",
            cfg,
            "--workers",
            "2",
            f"run.dir={ray_dir}",
            "train.check_replicas=true",
            *stage_args,
        ),
        ("train", cfg, f"run.dir={one_dir}", "parallel.grad_accum=2", *stage_args),
        env={**ray_env, "PWD": str(elsewhere)},
    )
    assert p.returncode == 0, p.stderr[-5000:]
    assert p1.returncode == 0, p1.stderr[-3000:]
    summary = json.loads((ray_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["replicas_identical"] is True  # every rank ends with the same parameters
    assert summary["samples_seen"] == json.loads((one_dir / "summary.json").read_text())["samples_seen"]
    ray_loss, one_loss = _losses(ray_dir), _losses(one_dir)
    assert len(ray_loss) == len(one_loss) == 20
    # Same init, lr schedule and global batches (16 samples: the data plan's order does not depend
    # on the world size; two ranks take 8 each, one process 2 micro-batches of 8): the same loss at
    # every step within float summation in another order, and both fall by at least a quarter.
    assert ray_loss == pytest.approx(one_loss, rel=1e-4)
    assert ray_loss[-1] < 0.75 * ray_loss[0] and one_loss[-1] < 0.75 * one_loss[0]
    out = p.stdout + p.stderr
    assert out.count("step 20/20 |") == 1  # one rank logs, once


def test_errors_name_the_rank_that_failed_and_the_run_records_it(in_workdir, tmp_path, ray_env):
    """A malformed row in a partition of rank 1 (data.on_error=fail) fails the run at a step: the
    driver names rank 1 and its row in one line, summary.json and `distrain status` say failed
    with rank 1's error, its type and the step reached. A missing path is refused by the driver in
    one line before Ray starts."""
    run_dir = tmp_path / "r"
    corpus = write_corpus(tmp_path / "bad", bad=(3, 15))  # partition 3 of 4: rank 1's
    args = [f"data.train_path={corpus}", "data.on_error=fail", "data.shuffle=false", "data.eval_path=null"]
    p = cli(
        *LAUNCH_TWO,
        f"run.dir={run_dir}",
        *args,
        *COMMON,
        env=ray_env,
    )
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("distrain: error:")]
    assert errors and all(
        re.fullmatch(
            r"distrain: error: rank 1: .*train-00003.jsonl line 16: malformed JSON.*data.on_error=skip", e
        )
        for e in errors
    ), p.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rank"] == 1 and summary["error_type"] == "DataError"
    assert 0 < summary["step"] < 20 and "train-00003.jsonl line 16" in summary["error"]
    st = json.loads(cli("status", run_dir, "--json", env=ray_env).stdout)
    assert (st["state"], st["step"], st["error"]) == ("failed", summary["step"], summary["error"])
    missing = tmp_path / "m"
    p = cli(
        *LAUNCH_TWO,
        f"run.dir={missing}",
        "data.train_path=nowhere/*.jsonl",
        env=ray_env,
    )
    assert p.returncode == 1 and not missing.exists()
    assert p.stderr.splitlines() == ["distrain: error: data.train_path: no data files at 'nowhere/*.jsonl'"]


def _ray_descendants(pid: int, marker: str) -> list:
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow  # minutes on 2 cores; the default suite keeps a stop notice to the driver
def test_killed_worker_is_restarted_and_the_run_resumes(in_workdir, tmp_path, ray_env):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(
        cli_cmd(
            *LAUNCH_TWO,
            f"run.dir={run_dir}",
            "cluster.max_failures=1",
            "train.steps=300",
            "train.log_every=5",
            "checkpoint.every_steps=20",
            "checkpoint.at_end=false",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_env,
    )
    cadence = 20  # checkpoint.every_steps
    try:
        wait_for_records(run_dir / "metrics.jsonl", 6, proc)  # past the checkpoint at step 20
        workers = _ray_descendants(proc.pid, "RayTrainWorker")
        assert len(workers) == 2, [w.cmdline() for w in workers]
        killed_at = complete_steps(run_dir / "metrics.jsonl")[-1]  # the last step logged before the kill
        os.kill(workers[-1].pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    # killed early in the run, moments after its 6th record (step 30), well before its end
    assert 30 <= killed_at <= 100, killed_at
    assert "resuming from the newest valid checkpoint" in out
    # the restarted group was handed the pointer of a checkpoint the first group saved: one of the
    # every-20-steps saves, at the latest the one after the last step logged before the kill
    pointers = [int(n) for n in re.findall(r"Ray's pointer: step (\d+)", out)]
    assert len(pointers) == 1, pointers  # one restart
    assert pointers[0] % cadence == 0 and cadence <= pointers[0] <= killed_at + cadence, (pointers, killed_at)
    # ...and resumed from the newest valid checkpoint, that one or (saved just before the kill, not
    # yet reported to Ray) the next
    resumed = [int(n) for n in re.findall(r"resumed from \S*/step(\d{8})\b", out)]
    assert len(resumed) == 1, out[-5000:]
    assert resumed[0] % cadence == 0 and pointers[0] <= resumed[0] <= killed_at + cadence, (
        resumed,
        killed_at,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 300
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(5, 301, 5))  # one record per log step: the file continued, no repeats
    assert summary["samples_seen"] == 300 * 16  # totals continued across the restart
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({d.name.rsplit("-", 1)[1] for d in offline}) == 1  # one W&B run


def test_a_notice_to_the_driver_checkpoints_every_worker_at_one_step_and_exits_75(
    in_workdir, tmp_path, ray_env
):
    """Ray Train runs the loop in a worker thread (no signal handlers there): SIGUSR1 to the driver
    (what a Slurm job's trap forwards) reaches every worker through a stop notice, they stop after
    the same step with one checkpoint, and the driver exits 75."""
    run_dir = tmp_path / "r"
    args = ["launch", "local", CONFIGS / "gpt-cpu-tiny.yaml", "--workers", "2", f"run.dir={run_dir}"]
    args += ["train.log_every=5", "checkpoint.every_steps=1000", "train.steps=400"]
    proc = subprocess.Popen(
        cli_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_env,
    )
    try:
        wait_for_records(run_dir / "metrics.jsonl", 3, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    stop = summary["step"]
    assert summary["status"] == "preempted" and 15 <= stop < 400
    ckpts = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")]
    assert ckpts == [f"step{stop:08d}"]  # one checkpoint, at the step every rank stopped after
    manifest = json.loads((run_dir / "checkpoints" / ckpts[0] / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rank-00000.pt", "rank-00001.pt"} <= set(manifest["files"])
    notice = json.loads((run_dir / "control" / "stop.json").read_text())
    assert notice["reason"] == "SIGUSR1" and len(notice["launch"]) == 16
    status = cli("status", str(run_dir), "--json", env=ray_env)  # a run of any launcher
    st = json.loads(status.stdout)
    assert (st["state"], st["step"], st["checkpoint"], st["slurm_job"]) == ("preempted", stop, ckpts[0], None)
    # launched again it resumes and is running; kill -9 of the whole job (driver, Ray, workers): stopped
    proc = subprocess.Popen(
        cli_cmd(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ray_env,
    )
    try:
        wait_for_records(run_dir / "metrics.jsonl", len(read_jsonl(run_dir / "metrics.jsonl")) + 2, proc)
        st = json.loads(cli("status", str(run_dir), "--json", env=ray_env).stdout)
        assert st["state"] == "running" and st["step"] > stop
    finally:
        kill_job(proc)
    st = json.loads(cli("status", str(run_dir), "--json", env=ray_env).stdout)
    assert st["state"] == "stopped" and st["step"] > stop and st["heartbeat"] is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def _non_loopback_peers(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
    bad = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 6 or not any(f"pid={p}," in cols[5] for p in pids):
            continue
        peer = cols[4].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
        if not (peer.startswith("127.") or peer == "::1"):
            bad.append(line)
    return bad


@pytest.mark.slow  # a two-node Ray job (spread over nodes) also runs in tests/test_slurm.py
def test_two_node_cluster_spreads_workers_and_takes_jobs(in_workdir, tmp_path, ray_env):
    """A head (127.0.0.2) and a worker node (127.0.0.3) from launch/ray-up.sh; a job submitted with
    launch/ray-submit.sh runs one worker per node; launch/ray-down.sh stops both nodes."""
    import psutil

    port, dash = _free_port(), _free_port()
    env = {**ray_env, "RAY_PORT": str(port), "RAY_DASHBOARD_PORT": str(dash), "RAY_NUM_CPUS": "1"}
    up = lambda **kw: subprocess.run(  # noqa: E731
        ["bash", str(REPO / "launch" / "ray-up.sh")],
        env={**env, **kw},
        capture_output=True,
        text=True,
        timeout=200,
    )
    try:
        p = up(RAY_ROLE="head", RAY_NODE_IP="127.0.0.2")
        assert p.returncode == 0, p.stdout + p.stderr
        p = up(RAY_ROLE="worker", RAY_NODE_IP="127.0.0.3", RAY_HEAD=f"127.0.0.2:{port}")
        assert p.returncode == 0, p.stdout + p.stderr
        run_dir = tmp_path / "run"
        sub = subprocess.run(
            [
                "bash",
                str(REPO / "launch" / "ray-submit.sh"),
                "cluster.placement=STRICT_SPREAD",
                "train.steps=10",
                "train.log_every=5",
                f"data.train_path={in_workdir}/data/pydoc/train-*.jsonl",
                f"data.eval_path={in_workdir}/data/pydoc/val.jsonl",
            ],
            env={
                **env,
                "RAY_JOBS": f"http://127.0.0.1:{dash}",
                "RAY_ADDRESS": f"127.0.0.2:{port}",
                "RUN_DIR": str(run_dir),
                "WORKERS": "2",
                "PYTHON": sys.executable,
                "EXCLUDES": "tests,benchmarks",
            },
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-5000:]
        assert "succeeded" in sub.stdout + sub.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["nodes"] == 2
        assert len({w["node"] for w in summary["workers"]}) == 2  # one worker on each Ray node
        pids = set()
        for f in (tmp_path / "nodes").glob("*.pid"):
            top = psutil.Process(int(f.read_text()))
            pids |= {top.pid, *(c.pid for c in top.children(recursive=True))}
        assert pids and not _non_loopback_peers(pids)  # every Ray connection stays on loopback
    finally:
        down = subprocess.run(
            ["bash", str(REPO / "launch" / "ray-down.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert down.returncode == 0, down.stderr
    assert not list((tmp_path / "nodes").glob("*.pid"))
