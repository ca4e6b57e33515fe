"""The `distrain` command as a user runs it: train end to end, Ctrl-C, errors, progress bar."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess

import pytest

from tests.conftest import CONFIGS, REPO, cli, cli_cmd, complete_steps, read_jsonl, wait_for_records


def test_train_command_end_to_end(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    p = cli(
        "train", CONFIGS / "gpt-cpu-tiny.yaml", f"run.dir={run_dir}", "train.steps=4", "train.log_every=2"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [2, 4]
    assert "step 4/4" in p.stderr and "world size 1" in p.stderr
    assert (run_dir / "checkpoints" / "step00000004").is_dir()
    st = json.loads(cli("status", run_dir, "--json").stdout)
    assert (st["state"], st["step"], st["checkpoint"], st["error"]) == ("completed", 4, "step00000004", None)
    # no third-party noise on a normal run: torch's CUDA-home notice on a
    # CPU machine, DeepSpeed's "built successfully" print
    for noise in ("set_vital", "No CUDA runtime", "CUDA_HOME", "built successfully", "Setting accelerator"):
        assert noise not in p.stdout + p.stderr, (noise, p.stdout[-2000:], p.stderr[-2000:])


def test_ctrl_c_finishes_the_step_and_stops_cleanly(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(
        cli_cmd(
            "train",
            CONFIGS / "gpt-cpu-tiny.yaml",
            f"run.dir={run_dir}",
            "train.steps=1000000",
            "train.log_every=1",
            "train.eval_every=0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    wait_for_records(metrics, 3, proc)
    before = complete_steps(metrics)[-1]  # one record per step: step `before` had ended
    proc.send_signal(signal.SIGINT)
    after = complete_steps(metrics)[-1]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # the step in flight is finished and no other: at the earliest the one after `before`, at the
    # latest the step after the one being logged as Ctrl-C came, two past the last record complete by then
    assert summary["status"] == "interrupted" and before + 1 <= summary["step"] <= after + 2, (
        before,
        summary["step"],
        after,
    )
    recs = read_jsonl(metrics)
    assert recs[-1]["step"] == summary["step"]  # the last finished step was logged
    assert (run_dir / "checkpoints" / f"step{summary['step']:08d}").is_dir()
    assert "Traceback" not in err


def test_config_error_exits_1_before_anything_runs(in_workdir, tmp_path):
    p = cli("train", CONFIGS / "gpt-cpu-tiny.yaml", f"run.dir={tmp_path / 'r'}", "optim.lrr=1", timeout=120)
    assert p.returncode == 1
    assert "unknown key 'optim.lrr'" in p.stderr and "did you mean 'optim.lr'" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()
    p = cli("train", CONFIGS / "gpt-cpu-tiny.yaml", "data.train_path=data/none.jsonl", timeout=300)
    assert p.returncode == 1 and "data.train_path: no data files at 'data/none.jsonl'" in p.stderr


def test_progress_bar_with_eta_on_a_terminal(in_workdir, tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cli_cmd(
            "train",
            CONFIGS / "gpt-cpu-tiny.yaml",
            f"run.dir={tmp_path / 'r'}",
            "train.steps=30",
            "checkpoint.at_end=false",
        ),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "160"},
    )
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "ETA" in text and "30/30" in text and "tok/s" in text


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "launch").glob("*.sh")))
def test_launch_scripts_have_help_and_a_dry_run(script, tmp_path):
    path = REPO / "launch" / script
    h = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "DRY_RUN" in h.stdout, h.stdout + h.stderr
    if script.startswith("ray-"):  # the others' dry runs install nothing but still check the venv
        env = {**os.environ, "DRY_RUN": "1", "RAY_STATE_DIR": str(tmp_path)}
        d = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, env=env)
        assert d.returncode == 0 and (d.stdout.startswith("+ ") or "no node started" in d.stdout), d.stdout
        assert not list(tmp_path.iterdir())  # nothing started, no pid file
        if script == "ray-up.sh":  # the dashboard binds to loopback unless asked otherwise
            assert "--dashboard-host 127.0.0.1" in d.stdout and "--node-ip-address 127.0.0.2" in d.stdout
