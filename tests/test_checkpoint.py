"""Checkpoints: atomic saves with a manifest, verified loads with fallback, retention, and resumed
runs that match uninterrupted ones bitwise."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from distrain.checkpoint import CheckpointError, list_checkpoints, newest_valid, verify
from distrain.config import load_config
from distrain.train import run, setup
from tests.conftest import CONFIGS, cli, cli_cmd, complete_steps, read_jsonl, wait_for_records


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _losses(run_dir) -> list[tuple[int, float]]:
    """(step, loss) of every training record, in file order (a repeated step shows twice)."""
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize(
    "stage, precision",
    [
        (0, "fp32"),
        pytest.param(2, "fp32", marks=pytest.mark.slow),  # ZeRO 2 and bf16 in -m slow
        pytest.param(2, "bf16", marks=pytest.mark.slow),
    ],
)
def test_preempted_and_resumed_run_matches_an_uninterrupted_one(in_workdir, tmp_path, stage, precision):
    steps = 150  # the notice comes at step 10 or so; the rest is what the resumed run must match
    over = [
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "data.shuffle_block=32",
        "checkpoint.at_end=false",
        f"parallel.zero_stage={stage}",
        f"parallel.precision={precision}",
        "model.dropout=0.1",
    ]
    ref_cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, f"run.dir={tmp_path / 'ref'}"])
    ref = setup(ref_cfg)
    run(ref_cfg, ref)

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cli_cmd("train", CONFIGS / "gpt-cpu-tiny.yaml", *over, f"run.dir={run_dir}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    wait_for_records(metrics, 10, proc)
    before = complete_steps(metrics)[-1]  # one record per step: step `before` had ended
    proc.send_signal(signal.SIGUSR1)  # a scheduler's preemption notice
    after = complete_steps(metrics)[-1]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped = json.loads((run_dir / "summary.json").read_text())
    # the notice came after step `before` ended, and one process stops at the end of the step in
    # flight (no agreement lag): at the latest the step after the one being logged as it came, two
    # past the last record complete by then
    assert stopped["status"] == "preempted" and before + 1 <= stopped["step"] <= after + 2, (
        before,
        stopped["step"],
        after,
    )
    assert complete_steps(metrics)[-1] == stopped["step"]  # the stopping step was logged
    assert (run_dir / "checkpoints" / f"step{stopped['step']:08d}" / "manifest.json").is_file()

    cfg = load_config(run_dir / "config.yaml")
    resumed = setup(cfg)
    assert resumed.trainer.step == stopped["step"]
    run(cfg, resumed)
    ref_losses, got = _losses(tmp_path / "ref"), _losses(run_dir)
    assert [step for step, _ in ref_losses] == list(range(1, steps + 1))
    # one record per step, in order: the resumed run continued the file and repeated no step
    assert [step for step, _ in got] == list(range(1, steps + 1))
    assert got == ref_losses  # bitwise: the same batches, dropout masks and optimizer state
    a, b = _weights(ref.engine), _weights(resumed.engine)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_same(x, y, where):
    if isinstance(x, dict):
        assert set(x) == set(y), where
        for k in x:
            # the run directory differs; wall time and what is measured over it (energy, MFU) too
            # and each run is its own W&B run
            if k not in (
                "config",
                "elapsed_s",
                "energy_j",
                "data_wait_s",
                "mfu_time_s",
                "mfu_x_time",
                "wandb_run_id",
            ):
                _assert_same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list | tuple):
        assert len(x) == len(y), where
        for i, (p, q) in enumerate(zip(x, y, strict=True)):
            _assert_same(p, q, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


def _save_run(tmp_path, *extra):
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            "train.steps=6",
            "train.eval_every=0",
            "checkpoint.every_steps=2",
            f"run.dir={tmp_path / 'run'}",
            *extra,
        ],
    )
    run(cfg)
    return tmp_path / "run" / "checkpoints"


def test_manifest_detects_truncation_and_alteration_and_load_falls_back(in_workdir, tmp_path, caplog):
    root = _save_run(tmp_path)
    assert [p.name for p in list_checkpoints(root)] == ["step00000006", "step00000004", "step00000002"]
    assert (root / "latest").read_text() == "step00000006"
    manifest = verify(root / "step00000006")
    assert {"distrain-state.pt", "rank-00000.pt", "model/mp_rank_00_model_states.pt"} <= set(
        manifest["files"]
    )
    shard = root / "step00000006" / "model/mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: \d+ bytes, the manifest says"):
        verify(root / "step00000006")
    state = root / "step00000004" / "rank-00000.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"rank-00000.pt: sha256 differs"):
        verify(root / "step00000004")
    ckpt, _ = newest_valid(root)
    assert ckpt.name == "step00000002"
    assert "step00000006 is not usable" in caplog.text and "step00000004 is not usable" in caplog.text
    # the run resumes from the newest valid checkpoint and finishes
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.steps=8"])
    s = setup(cfg)
    assert s.trainer.step == 2
    assert run(cfg, s)["step"] == 8


KILL_DURING_SAVE = r"""
import os
import signal
import sys
from pathlib import Path

import distrain.checkpoint as ck
from distrain.config import load_config
from distrain.train import run

point = sys.argv[1]  # manifest: as step 3's manifest is written; latest: as latest is pointed at step 3
real_write = ck._write_atomic


def write_atomic(path, text):
    path = Path(path)
    if point == "manifest" and path.name == "manifest.json" and path.parent.name == ".tmp-step00000003":
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "latest" and path.name == "latest" and text == "step00000003":
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, text)


ck._write_atomic = write_atomic
cfg = load_config(sys.argv[2], sys.argv[3:])
run(cfg)
"""


@pytest.mark.parametrize(
    "point, mode",
    [
        ("manifest", "sync"),
        ("latest", "async"),
        pytest.param("manifest", "async", marks=pytest.mark.slow),  # the default suite keeps its time
        pytest.param("latest", "sync", marks=pytest.mark.slow),
    ],
)
def test_kill_9_during_saves_never_loses_the_run(in_workdir, tmp_path, point, mode):
    """kill -9 of the process inside step 3's save, at the two moments that decide which checkpoint
    is the run's: as the manifest of `.tmp-step00000003` is about to be written (every file of the
    save is on disk, nothing says it is complete) and as `latest` is about to point at the renamed
    step00000003. Either way nothing is lost: the run resumes from the newest complete checkpoint.
    With checkpoint.async the kill comes from the background writer thread."""
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            point,
            str(CONFIGS / "gpt-cpu-tiny.yaml"),
            f"run.dir={run_dir}",
            "train.steps=6",
            "train.eval_every=0",
            "checkpoint.every_steps=1",
            f"checkpoint.async={mode == 'async'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    tmp = root / ".tmp-step00000003"
    assert (root / "latest").read_text() == "step00000002"  # latest was never moved
    if point == "manifest":  # killed mid-save: all of step 3's files, no manifest, not in place
        assert tmp.is_dir() and (tmp / "model/mp_rank_00_model_states.pt").is_file()
        assert not (tmp / "manifest.json").exists()
        assert not (root / "step00000003").exists()
        expected = 2
    else:  # killed after the rename: step 3 is complete although latest still names step 2
        assert not tmp.exists()
        expected = 3
    assert [c.name for c in list_checkpoints(root)][0] == f"step{expected:08d}"
    ckpt, manifest = newest_valid(root)
    assert ckpt.name == f"step{expected:08d}" and manifest["step"] == expected
    cfg = load_config(run_dir / "config.yaml", ["train.steps=4"])
    s = setup(cfg)
    if point == "manifest":
        assert s.trainer.step == 2
    else:
        assert s.trainer.step == 3
    assert run(cfg, s)["status"] == "completed"
    assert not tmp.exists()  # no save is left half-written (manifest: step 3 saved again over it)
    assert verify(root / "step00000003")["step"] == 3
    assert verify(root / "step00000004")["step"] == 4
    assert (root / "latest").read_text() == "step00000004"


def test_a_refused_launch_leaves_the_run_directory_untouched(in_workdir, tmp_path):
    """Another config pointed at a used run dir with checkpoint.resume=false is refused, and the
    run's config.yaml is still its own: a later `distrain resume` continues the right run."""
    _save_run(tmp_path)
    run_dir = tmp_path / "run"
    before = {f: f.read_bytes() for f in run_dir.iterdir() if f.is_file()}
    p = cli("train", CONFIGS / "lstm-cpu-tiny.yaml", f"run.dir={run_dir}", "checkpoint.resume=false")
    assert p.returncode == 1 and "already holds checkpoints" in p.stderr, p.stderr[-3000:]
    assert {f: f.read_bytes() for f in run_dir.iterdir() if f.is_file()} == before
    assert load_config(run_dir / "config.yaml").model.name == "gpt"


def test_resume_with_another_model_is_refused_naming_the_keys(in_workdir, tmp_path):
    root = _save_run(tmp_path)
    run_dir = tmp_path / "run"
    config = (run_dir / "config.yaml").read_bytes()
    p = cli("resume", run_dir, "model.preset=mini", "parallel.precision=bf16", "train.steps=8")
    assert p.returncode == 1, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("distrain: error:")]
    assert len(err) == 1, p.stderr[-3000:]  # one line, not a load_state_dict key dump
    assert "a resume may not change" in err[0] and "model.preset: 'tiny' -> 'mini'" in err[0]
    assert "parallel.precision: 'fp32' -> 'bf16'" in err[0] and "train.steps" not in err[0]
    assert "Traceback" not in p.stderr
    assert (run_dir / "config.yaml").read_bytes() == config  # nothing written before acceptance
    assert [c.name for c in list_checkpoints(root)][0] == "step00000006"


def test_retention_keeps_last_n_and_every_k(in_workdir, tmp_path):
    root = _save_run(
        tmp_path,
        "train.steps=10",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "checkpoint.keep_every=4",
    )
    assert [p.name for p in list_checkpoints(root)] == [
        "step00000010",
        "step00000009",
        "step00000008",
        "step00000004",
    ]


def test_resume_false_refuses_a_used_run_dir_and_resume_command(in_workdir, tmp_path):
    _save_run(tmp_path)
    cfg = load_config(tmp_path / "run" / "config.yaml", ["checkpoint.resume=false"])
    with pytest.raises(CheckpointError, match="already holds checkpoints and checkpoint.resume=false"):
        setup(cfg)
    p = cli("resume", tmp_path / "run", "train.steps=8")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "(saved at step 6)" in p.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 8
    p = cli("resume", tmp_path / "nothing", timeout=120)
    assert p.returncode == 1 and "has no config.yaml" in p.stderr


def test_every_minutes_saves_on_time(in_workdir, tmp_path):
    root = _save_run(
        tmp_path, "checkpoint.every_steps=0", "checkpoint.every_minutes=0.00001", "checkpoint.at_end=false"
    )
    assert [p.name for p in list_checkpoints(root)] == [f"step{s:08d}" for s in range(6, 0, -1)]


def test_async_saves_write_the_same_checkpoints_and_report_writer_failures(
    in_workdir, tmp_path, caplog, monkeypatch
):
    import distrain.checkpoint as ck

    sync_root = _save_run(tmp_path / "sync")
    async_root = _save_run(tmp_path / "async", "checkpoint.async=true")
    for step in (2, 4, 6):  # the same checkpoints, tensor for tensor
        a, b = verify(sync_root / f"step{step:08d}")["files"], verify(async_root / f"step{step:08d}")["files"]
        assert set(a) == set(b)
        for name in ("model/mp_rank_00_model_states.pt", "rank-00000.pt", "distrain-state.pt"):
            x = torch.load(sync_root / f"step{step:08d}" / name, weights_only=True)
            y = torch.load(async_root / f"step{step:08d}" / name, weights_only=True)
            _assert_same(x, y, name)

    real_touch, calls = ck._touch, []

    def failing_touch(path):  # the disk fails while the writer finishes the second checkpoint
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_touch(path)

    monkeypatch.setattr(ck, "_touch", failing_touch)
    root = _save_run(tmp_path / "failing", "checkpoint.async=true")
    assert [p.name for p in list_checkpoints(root)] == [
        "step00000006",
        "step00000002",
    ]  # step 4 never completed
    assert "background checkpoint save failed" in caplog.text and "No space left on device" in caplog.text


def test_a_resume_that_extends_train_steps_steps_at_the_new_schedules_lr(in_workdir, tmp_path):
    """A run of 6 steps resumed to 12: from step 7 on, the cosine schedule of 12 steps (the lr the
    optimizer's saved state holds is the 6-step schedule's floor)."""
    over = ["train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2", "tracking.wandb.mode=disabled"]
    ref = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "train.steps=12", f"run.dir={tmp_path / 'ref'}"])
    run(ref)
    for steps in (6, 12):
        run(
            load_config(
                CONFIGS / "gpt-cpu-tiny.yaml", [*over, f"train.steps={steps}", f"run.dir={tmp_path / 'run'}"]
            )
        )
    want = [(r["step"], r["lr"]) for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]
    got = [(r["step"], r["lr"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert got[6:] == want[6:]
