"""`distrain submit slurm` against a real Slurm: Debian's slurmctld and two slurmd (node1, node2) on
this machine's loopback (launch/slurm-local.sh), each Ray node on its own 127.0.0.x address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, cli, cli_all, read_jsonl, write_corpus

VENV_BIN = Path(sys.executable).parent
HAVE_SLURM = shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()
needs_slurm = pytest.mark.skipif(not HAVE_SLURM, reason="Slurm is not installed (.ci/run installs it)")

JOB = [
    f'cluster.slurm.setup=["source {VENV_BIN}/activate"]',
    "cluster.slurm.ray_node_ip=127.0.0.$((2 + SLURM_NODEID))",
    "cluster.slurm.cpus_per_task=2",
    "tracking.wandb.mode=offline",
    "train.check_replicas=true",
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(
        ["bash", str(REPO / "launch/slurm-local.sh"), "up", str(d)], capture_output=True, text=True
    )
    assert up.returncode == 0, up.stdout + up.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    yield d
    subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], capture_output=True)
    subprocess.run(["bash", str(REPO / "launch/slurm-local.sh"), "down", str(d)], capture_output=True)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def submission(run_dir: Path, *args) -> tuple:
    """The arguments of ``distrain submit slurm`` for the tiny GPT in ``run_dir``."""
    return ("submit", "slurm", str(CONFIGS / "gpt-cpu-tiny.yaml"), f"run.dir={run_dir}", *JOB, *args)


def job_id(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("submitted job"))
    return line.split()[2].rstrip(";")


def submit(run_dir: Path, *args) -> str:
    return job_id(cli(*submission(run_dir, *args)))


def jobs(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "jobs.jsonl"
    return read_jsonl(path) if path.exists() else []


def wait_done(run_dir: Path, job: str, timeout: float = 600) -> dict:
    """Until the job has left the queue for good (its last start has an exit and it is not requeued)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        q = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if (
            q in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            and jobs(run_dir)
            and "exit" in jobs(run_dir)[-1]
        ):
            return jobs(run_dir)[-1]
        time.sleep(2)
    log = run_dir / "slurm" / f"slurm-{job}.out"
    raise AssertionError(
        f"job {job} still queued after {timeout}s:\n{log.read_text()[-4000:] if log.exists() else ''}"
    )


def wait_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in read_jsonl(path) if "loss" in r):
            return
        ended = [j for j in jobs(run_dir) if "exit" in j]
        assert not ended, f"the job ended ({ended[-1]}) before step {step}:\n" + "".join(
            p.read_text()[-3000:] for p in (run_dir / "slurm").glob("slurm-*.out")
        )
        time.sleep(0.5)
    raise AssertionError(f"{run_dir}: no step {step} within {timeout}s")


def test_dry_run_renders_the_job_and_writes_nothing(in_workdir, tmp_path):
    run_dir = tmp_path / "run"
    gpt = str(CONFIGS / "gpt-cpu-tiny.yaml")
    out, bad, one = cli_all(
        (
            "submit", "slurm", gpt, "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "4",
            "--time", "30", "--partition", "gpu", "--account", "proj", "--qos", "high", "--constraint",
            "h100", "--dry-run", f"run.dir={run_dir}", "cluster.slurm.sbatch=[--exclusive]",
        ),
        # a batch layout that does not fit the allocation is refused before anything is rendered
        ("submit", "slurm", gpt, "--nodes", "3", "--dry-run", f"run.dir={run_dir}", "data.partitions=4"),
        ("submit", "slurm", gpt, "--dry-run", f"run.dir={run_dir}"),
    )  # fmt: skip
    assert out.returncode == 0 and one.returncode == 0, out.stderr[-3000:] + one.stderr[-3000:]
    script = out.stdout
    for line in (
        "#SBATCH --nodes=2", "#SBATCH --cpus-per-task=4", "#SBATCH --time=30", "#SBATCH --requeue",
        "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --exclusive",
        "LAUNCHER=ray", "WORKERS=2", "scontrol requeue", "srun --overlap", "ray}\" get-auth-token",
    ):  # fmt: skip
        assert line in script, line
    assert "{{" not in script and "# 2 node(s) x 1 worker(s) = 2 rank(s)" in script and not run_dir.exists()
    assert "# checks passed:" in script and "# data: 4 partitions" in script  # derived for 2 ranks
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert bad.returncode == 1 and "data.partitions=4 is not divisible by the world size 3" in bad.stderr
    assert "LAUNCHER=train" in one.stdout and "WORKERS=1" in one.stdout


def test_stop_notices_are_for_one_launch_and_the_deadline_leaves_time_to_save(tmp_path, monkeypatch):
    from distrain import notices
    from distrain.cluster.control import write_notice

    monkeypatch.setenv(notices.LAUNCH_ID, "a" * 16)
    monkeypatch.delenv(notices.DEADLINE, raising=False)
    watch = notices.StopWatch(tmp_path)
    assert watch.check() is None  # no notice
    write_notice(tmp_path, "b" * 16, "SIGUSR1")  # an earlier launch's notice
    watch._next = 0.0
    assert watch.check() is None
    write_notice(tmp_path, "a" * 16, "SIGUSR1")
    watch._next = 0.0
    assert watch.check() == "preempted"
    monkeypatch.setenv(notices.DEADLINE, str(time.time() + 60))
    watch = notices.StopWatch(tmp_path / "other")
    watch.step_s, watch.save_s = 1.0, 10.0
    assert watch.margin() == 15 + 2 + 15 and watch.check() is None  # 60 s left, 32 s needed
    watch.save_s = 40.0
    assert watch.check() == "time limit"


def test_submit_without_sbatch_is_a_clear_error(in_workdir, tmp_path):
    env = {**os.environ, "PATH": str(VENV_BIN)}
    out = cli(
        "submit",
        "slurm",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={tmp_path / 'r'}",
        env=env,
        check=False,
    )
    assert out.returncode == 1 and "sbatch is not on PATH" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slurm
@needs_slurm
def test_one_node_job_without_ray_completes_and_a_failing_job_is_not_requeued(in_workdir, tmp_path, slurm):
    good, bad, killed = tmp_path / "good", tmp_path / "bad", tmp_path / "killed"
    corpus = write_corpus(tmp_path / "corpus", bad=(3, 15))  # a malformed row, met at a step
    fail = ["data.on_error=fail", "data.shuffle=false", "data.eval_path=null", "train.log_every=1"]
    # submitted at once: the good and the failing job take the two nodes
    *submitted, missing, nope = cli_all(
        submission(good, "train.steps=12", "--time", "5"),
        submission(bad, "train.steps=30", f"data.train_path={corpus}", *fail),
        # a missing path is refused at submission, before sbatch: no job, nothing written
        submission(tmp_path / "missing", "data.train_path=data/missing/*.jsonl"),
        # sbatch's own refusal is shown as it is, and the new run directory is not left behind
        submission(tmp_path / "nope", "--partition", "nope"),
    )
    j1, j2 = map(job_id, submitted)
    # queued behind them (a later job id), it starts when the failing one ends
    j3 = submit(killed, "train.steps=100000", "train.log_every=1", "train.eval_every=0")
    assert missing.returncode == 1
    assert "data.train_path: no data files at 'data/missing/*.jsonl'" in missing.stderr
    assert not (tmp_path / "missing").exists()
    assert (
        nope.returncode == 1
        and "sbatch refused the job" in nope.stderr
        and "invalid partition" in nope.stderr
    )
    assert not (tmp_path / "nope").exists()
    end = wait_done(good, j1)
    assert end["exit"] == 0, (good / "slurm" / f"slurm-{j1}.out").read_text()[-3000:]
    summary = json.loads((good / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 12 and summary["slurm_job_id"] == j1
    assert (good / "checkpoints" / "step00000012").is_dir()
    end = wait_done(bad, j2)
    assert end["exit"] == 1 and len([j for j in jobs(bad) if "start" in j]) == 1  # not requeued
    log = (bad / "slurm" / f"slurm-{j2}.out").read_text()
    assert "distrain: error:" in log and "train-00003.jsonl line 16: malformed JSON" in log
    summary = json.loads((bad / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_type"] == "DataError" and 0 < summary["step"] < 30
    st = json.loads(cli("status", str(bad), "--json", check=True).stdout)
    assert (st["state"], st["error"], st["slurm_job"]) == ("failed", summary["error"], j2)
    st = json.loads(cli("status", str(good), "--json", check=True).stdout)
    assert (st["state"], st["step"], st["steps"], st["checkpoint"]) == ("completed", 12, 12, "step00000012")
    # running, then killed without warning (kill -9 of the training process, as a lost node): stopped
    wait_step(killed, 3)
    st = json.loads(cli("status", str(killed), "--json", check=True).stdout)
    assert (st["state"], st["slurm_job"]) == ("running", j3) and st["step"] >= 3
    os.kill(json.loads((killed / "heartbeat.json").read_text())["pid"], signal.SIGKILL)
    t0 = time.time()
    while (state := json.loads(cli("status", str(killed), "--json", check=True).stdout))[
        "state"
    ] == "running":
        assert time.time() - t0 < 120, state
        time.sleep(1)
    assert state["state"] == "stopped" and state["heartbeat"] is not None and state["step"] >= 3, state


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_two_node_ray_job_survives_preemption_and_matches_an_uninterrupted_run(in_workdir, tmp_path, slurm):
    """One Ray worker per node (STRICT_SPREAD). `scancel --signal=USR1 --batch` mid-run: every rank
    checkpoints at one step, the job exits 75 and requeues itself, and the requeued job finishes
    the same run: weights equal to an uninterrupted run's, one W&B run, no step logged twice."""
    ref, pre = tmp_path / "ref", tmp_path / "pre"
    steps = [
        "train.steps=120",
        "train.log_every=5",
        "checkpoint.every_steps=1000",
        "--nodes",
        "2",
        "--time",
        "20",
    ]
    j = submit(ref, *steps)
    assert wait_done(ref, j)["exit"] == 0, (ref / "slurm" / f"slurm-{j}.out").read_text()[-3000:]
    ref_summary = json.loads((ref / "summary.json").read_text())
    assert ref_summary["status"] == "completed" and ref_summary["replicas_identical"]
    log = (ref / "slurm" / f"slurm-{j}.out").read_text()
    assert "STRICT_SPREAD" in log and "ip=127.0.0.2" in log and "ip=127.0.0.3" in log

    j = submit(pre, *steps)
    wait_step(pre, 20)
    subprocess.run(["scancel", "--signal=USR1", "--batch", j], check=True)
    end = wait_done(pre, j)
    runs = jobs(pre)
    starts = [r for r in runs if "start" in r]
    exits = [r["exit"] for r in runs if "exit" in r]
    assert [s["restart"] for s in starts] == [0, 1] and exits == [75, 0], runs
    assert end["exit"] == 0
    summary = json.loads((pre / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["slurm_restart_count"] == 1
    assert summary["params_sha256"] == ref_summary["params_sha256"]
    log = (pre / "slurm" / f"slurm-{j}.out").read_text()
    stopped = [ln for ln in log.splitlines() if "preempted at step" in ln]
    assert stopped, log[-3000:]
    saved = sorted(p.name for p in (pre / "checkpoints").iterdir() if p.is_dir())
    assert len(saved) == 2 and saved[-1] == "step00000120"  # the preemption checkpoint and the last
    steps_logged = [r["step"] for r in read_jsonl(pre / "metrics.jsonl") if "loss" in r]
    assert len(steps_logged) == len(set(steps_logged)) and steps_logged[-1] == 120
    wandb_runs = {p.name.rsplit("-", 1)[-1] for p in (pre / "wandb").glob("offline-run-*")}
    assert len(wandb_runs) == 1
    st = json.loads(cli("status", str(pre), "--json", check=True).stdout)
    assert (st["state"], st["restarts"], st["slurm_job"]) == ("completed", 1, j)


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_a_time_limit_shorter_than_training_checkpoints_before_it_and_requeues(in_workdir, tmp_path, slurm):
    """--time=1 (60 s) for a run that needs more, and no signal (cluster.slurm.grace_s=0, a site that
    sends none): the trainer stops before the limit from its step and save times; the job requeues
    and the run completes."""
    run = tmp_path / "limit"
    j = submit(run, "train.steps=1500", "train.log_every=50", "--time", "1", "cluster.slurm.grace_s=0")
    end = wait_done(run, j, timeout=900)
    runs = jobs(run)
    exits = [r["exit"] for r in runs if "exit" in r]
    assert exits[0] == 75 and exits[-1] == 0 and end["exit"] == 0, runs
    log = (run / "slurm" / f"slurm-{j}.out").read_text()
    assert "time limit is near" in log and "TIMEOUT" not in log and "DUE TO TIME LIMIT" not in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 1500


def test_jobs_sharing_a_node_never_share_ports():
    """Two job ids that agree modulo 100 get other port blocks, and a block in use on the node is
    passed over before Ray starts."""
    import socket

    from distrain.cluster.slurm import PORT_BLOCK, block_free, free_block, port_blocks

    a, b = port_blocks("1234"), port_blocks("1334")
    assert a[0] != b[0] and sorted(a) == sorted(b) and len(set(a)) == 100
    assert all(10000 <= base and base + PORT_BLOCK <= 30000 for base in a)
    first = free_block("1234")
    with socket.socket() as held:  # another job's Ray holds a port of the block
        held.bind(("127.0.0.1", first + 41))
        held.listen()
        assert not block_free(first)
        other = free_block("1234")
        assert other != first and block_free(other)
        out = cli("cluster", "ports", "--job-id", "1234", "--check", str(first), check=False)
        assert out.returncode == 1
    assert cli("cluster", "ports", "--job-id", "1234", check=True).stdout.strip() == str(first)
    assert int(cli("cluster", "ports", "--job-id", "1234", "--after", str(first), check=True).stdout) != first
