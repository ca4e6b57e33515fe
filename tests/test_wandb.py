"""W&B: one run per job from rank 0, read back from the offline run with wandb's own record schema;
the same run across resume; failures fall back to local logging; the API key is never written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distrain.tracking import wandb_mode
from tests.conftest import CONFIGS, cli, cli_cmd, read_jsonl, read_wandb, wandb_history

PLANTED = "distrain0planted0key0" + "5f3a9c1e7b2d4680aa11"  # 41 characters, shaped like a W&B key


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _wandb_file(offline_run: Path) -> Path:
    (f,) = offline_run.glob("run-*.wandb")
    return f


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(extra)
    return env


def test_mode_defaults_to_offline_without_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)
    assert wandb_mode(None) == "online"
    assert wandb_mode("disabled") == "disabled"


def test_offline_run_holds_every_key_config_topology_and_summary(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    p = cli(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=10",
        "train.log_every=5",
        "checkpoint.every_steps=5",
        "tracking.wandb.log_checkpoints=true",
        "tracking.wandb.tags=[cpu, tiny]",
        "tracking.wandb.group=g1",
        env=_env(),  # no key, no WANDB_MODE: the default must be offline
    )
    assert p.returncode == 0, p.stderr[-3000:]
    banner = next(ln for ln in p.stderr.splitlines() if "distrain: run gpt-cpu-tiny" in ln)
    for part in (f"dir {run_dir}", "world size 1", "device cpu", "ZeRO 0", "fp32", "W&B offline in"):
        assert part in banner, banner
    (offline,) = _offline_runs(run_dir)  # one run per job
    records = read_wandb(_wandb_file(offline))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = records[kinds.index("run")].run
    assert run.project == "distrain" and run.display_name == "gpt-cpu-tiny" and run.run_group == "g1"
    assert list(run.tags) == ["cpu", "tiny"]
    history = [h for h in wandb_history(_wandb_file(offline)) if "loss" in h]
    jsonl = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [h["step"] for h in history] == [r["step"] for r in jsonl] == [5, 10]
    numeric = {
        k for r in jsonl for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert numeric <= set(history[-1]), numeric - set(history[-1])
    assert history[-1]["loss"] == pytest.approx(jsonl[-1]["loss"])
    config = {i.key: json.loads(i.value_json) for i in run.config.update}  # the resolved config + topology
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["topology"]["zero_stage"] == 0 and config["topology"]["world_size"] == 1
    assert config["train"]["steps"] == 10 and config["tracking"]["wandb"]["group"] == "g1"
    summary_keys = {
        i.key or i.nested_key[0]
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert {"status", "tokens_seen", "energy_kwh", "mean_mfu", "summary_table"} <= summary_keys
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    checkpoints = [a for a in artifacts if a.type == "model"]
    assert len(checkpoints) == 2 and all(
        a.name == "gpt-cpu-tiny-checkpoint" for a in checkpoints
    )  # steps 5, 10
    assert "exit" in kinds
    dry = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(offline)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert dry.returncode == 0 and "Would sync 1 run" in dry.stdout + dry.stderr


def test_resumed_run_continues_the_same_wandb_run(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    common = ["train.log_every=5", "checkpoint.at_end=true"]
    p = cli(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=10",
        *common,
        env=_env(),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    p = cli("resume", str(run_dir), "train.steps=20", env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = _offline_runs(run_dir)
    ids = {f.name.rsplit("-", 1)[1] for f in (first, second)}
    assert len(ids) == 1  # one W&B run: the resumed job logs under the saved id
    steps = [h["step"] for h in wandb_history(_wandb_file(second)) if "loss" in h]
    assert steps == [15, 20]  # the step axis continues, it does not start again


def test_wandb_failures_fall_back_to_local_logging(in_workdir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # the two runs at once: a W&B directory that cannot be made, and a key W&B rejects at a server
    # address where nothing listens (loopback only)
    env = _env(WANDB_API_KEY=PLANTED, WANDB_BASE_URL="http://127.0.0.1:9")
    runs = {
        name: subprocess.Popen(
            cli_cmd(
                "train",
                CONFIGS / "gpt-cpu-tiny.yaml",
                f"run.dir={tmp_path / name}",
                "train.steps=4",
                "train.log_every=2",
                *extra,
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, extra in {
            "bad-dir": [f"tracking.wandb.dir={blocker}/wandb", "tracking.wandb.mode=offline"],
            "bad-key": ["tracking.wandb.mode=online", "tracking.wandb.init_timeout=10"],
        }.items()
    }
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err[-3000:])
        assert err.count("W&B could not start") == 1, (name, err[-3000:])
        assert [r["step"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r] == [2, 4]
        assert PLANTED not in out + err
        _assert_key_absent(tmp_path / name)


def _assert_key_absent(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            assert PLANTED.encode() not in f.read_bytes(), f"the API key was written into {f}"


def test_api_key_is_never_written(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    p = cli(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=6",
        "train.log_every=2",
        "checkpoint.every_steps=3",
        "tracking.wandb.mode=offline",
        "tracking.wandb.log_checkpoints=true",
        env=_env(WANDB_API_KEY=PLANTED),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert _offline_runs(run_dir) and list(run_dir.glob("checkpoints/step*/*.pt"))
    assert PLANTED not in p.stdout + p.stderr
    _assert_key_absent(run_dir)  # config.yaml, metrics, summary, checkpoints, the W&B run and its logs


def test_a_wandb_service_that_dies_mid_run_does_not_fail_the_run(in_workdir, tmp_path):
    """W&B's service process lost during training (killed with the job step by a scheduler, out of
    memory): the run goes on, logging locally, and completes."""
    import psutil

    from distrain.config import load_config
    from distrain.train import run, setup

    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [f"run.dir={tmp_path / 'r'}", "train.steps=6", "train.log_every=1", "tracking.wandb.mode=offline"],
    )
    session = setup(cfg)
    services = [
        p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline()).lower()
    ]
    assert services, "no W&B service process under this one"
    for p in services:  # the service this test's run started
        p.kill()
    psutil.wait_procs(services, timeout=30)
    summary = run(cfg, session)
    assert summary["status"] == "completed" and summary["step"] == 6
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r] == list(
        range(1, 7)
    )
