"""Two CPU processes over gloo under torchrun: the worker code does not care who launched it."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import CONFIGS, cli, cli_cmd, read_jsonl, torchrun_cmd


@pytest.mark.world_size
def test_torchrun_two_ranks_zero2_logs_once(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    p = cli(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=30",
        "train.log_every=5",
        "parallel.zero_stage=2",
        "checkpoint.at_end=false",
        "cluster.workers=2",
        ranks=2,
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
    st = json.loads(cli("status", str(run_dir), "--json").stdout)
    assert (st["state"], st["step"], st["steps"]) == ("completed", 30, 30)


@pytest.mark.world_size
@pytest.mark.parametrize(
    "first, second",
    [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)],  # 2 -> 1: also the elastic drill's shrink (slow)
)
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
    p = cli(*args, "train.steps=20", f"cluster.workers={first}", ranks=first)  # saves at the end
    assert p.returncode == 0, p.stderr[-4000:]
    before = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    p = cli(*args, "train.steps=40", f"cluster.workers={second}", ranks=second)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"saved by {first} workers and this run has {second}" in p.stderr and "resumed from" in p.stderr
    after = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in after] == list(range(2, 41, 2))  # the second attempt took over at step 20
    # the loss curve continues where the first attempt left it, far below where training started
    resumed = next(r for r in after if r["step"] == 22)["loss"]
    assert before[-1]["step"] == 20
    assert resumed < before[0]["loss"] - 1.0 and resumed < before[-1]["loss"] + 0.3  # no jump back up


def _rank_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of the worker process of ``rank`` started by the torchrun agent ``parent``."""
    import time
    from pathlib import Path

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in Path("/proc").glob("[0-9]*"):
            try:
                stat = (child / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                env = (child / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in env:
                return int(child.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under torchrun pid {parent}")


@pytest.mark.world_size
def test_a_notice_to_one_rank_checkpoints_every_rank_at_one_step(in_workdir, tmp_path):
    """SIGUSR1 reaches rank 1 only (as a scheduler may deliver it): the ranks agree on one step
    boundary, write one checkpoint there together and end as preempted."""
    import json
    import os
    import signal

    from distrain.checkpoint import newest_valid
    from tests.conftest import wait_for_records

    run_dir = tmp_path / "r"
    cmd = cli_cmd(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=100000",
        "train.log_every=1",
        "train.eval_every=0",
        "cluster.workers=2",
        ranks=2,
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(run_dir / "metrics.jsonl", 5, proc)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted", stderr[-3000:]
    ckpt, manifest = newest_valid(run_dir / "checkpoints")
    assert manifest["step"] == summary["step"] and manifest["world_size"] == 2
    assert {"rank-00000.pt", "rank-00001.pt"} <= set(manifest["files"])  # both ranks wrote at that step
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == summary["step"]
    st = json.loads(cli("status", str(run_dir), "--json").stdout)
    assert (st["state"], st["step"], st["checkpoint"]) == ("preempted", summary["step"], ckpt.name)


@pytest.mark.world_size
def test_every_minutes_on_two_ranks_saves_by_rank_0s_clock_never_twice(in_workdir, tmp_path):
    """A period shorter than a step: rank 0's request is agreed at the next boundary, the save is
    made there by both ranks, and the request it answered is not saved again."""
    from distrain.checkpoint import list_checkpoints

    run_dir = tmp_path / "r"
    p = cli(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        "train.steps=8",
        "train.eval_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0.00001",
        "checkpoint.at_end=false",
        "cluster.workers=2",
        ranks=2,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert [c.name for c in list_checkpoints(run_dir / "checkpoints")] == [
        f"step{s:08d}" for s in (8, 6, 4, 2)
    ]


DIVERGE = r"""
import sys

import torch

from distrain.config import load_config
from distrain.train import run, setup

cfg = load_config(sys.argv[1], sys.argv[2:])
s = setup(cfg)
if s.dist.rank == 1:  # a replica drifts (a silent hardware fault would look the same)
    with torch.no_grad():
        next(s.engine.module.parameters()).add_(1.0)
run(cfg, s)
"""


@pytest.mark.world_size
def test_a_failed_replica_check_fails_the_run_in_summary_and_wandb(in_workdir, tmp_path):
    from tests.conftest import read_wandb

    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE)
    run_dir = tmp_path / "r"
    p = subprocess.run(
        torchrun_cmd(
            str(script),
            str(CONFIGS / "gpt-cpu-tiny.yaml"),
            f"run.dir={run_dir}",
            "cluster.workers=2",
            "train.steps=4",
            "train.eval_every=0",
            "train.check_replicas=true",
            "checkpoint.at_end=false",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode != 0
    assert "parameters of rank(s) [1] differ from rank 0's" in p.stderr, p.stderr[-3000:]
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank(s) [1] differ" in summary["error"]
    assert summary["step"] == 4  # training itself completed
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit for r in read_wandb(log) if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[-1].exit_code == 1  # the W&B run is marked failed


FULL_DISK_ON_RANK_1 = r"""
import resource
import signal
import sys

from distrain.config import load_config
from distrain.train import run, setup

cfg = load_config(sys.argv[1], sys.argv[2:])
s = setup(cfg)
if s.dist.rank == 1:  # from here on rank 1 cannot write a file over 64 KiB (EFBIG, as on a full disk)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
run(cfg, s)
"""


@pytest.mark.world_size
def test_a_background_save_failing_on_rank_1_is_known_to_every_rank_at_once(in_workdir, tmp_path):
    """Rank 1's writer fails (its ZeRO-2 optimizer shard is over its file-size limit): rank 0 stops
    waiting for rank 1's files at once, the failure is reported at the next save and at the end,
    and no incomplete checkpoint becomes `latest`; training goes on."""
    import json
    import time

    from distrain.checkpoint import list_checkpoints

    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_ON_RANK_1)
    run_dir = tmp_path / "r"
    t0 = time.monotonic()
    p = subprocess.run(
        torchrun_cmd(
            str(script),
            str(CONFIGS / "gpt-cpu-tiny.yaml"),
            f"run.dir={run_dir}",
            "cluster.workers=2",
            "train.steps=6",
            "train.eval_every=0",
            "parallel.zero_stage=2",
            "checkpoint.every_steps=2",
            "checkpoint.async=true",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    reports = [ln for ln in p.stderr.splitlines() if "background checkpoint save failed" in ln]
    assert len(reports) >= 3, p.stderr[-4000:]  # at the saves of steps 4 and 6 and at the end
    assert all("rank 1: " in ln for ln in reports), reports  # torch's writer fails on the size limit
    assert "rank-00001 failed" in p.stderr  # rank 0's writer stopped waiting for rank 1's files
    assert list_checkpoints(run_dir / "checkpoints") == []
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert elapsed < 300  # not an hour's wait for a marker that never comes


@pytest.mark.world_size
def test_zero3_eval_runs_the_same_number_of_batches_on_every_rank(in_workdir, tmp_path):
    """Two eval files, one per rank, of very different sizes: rank 1 holds one eval micro-batch and
    rank 0 many. Under ZeRO 3 every forward gathers parameters from both ranks, so both run one."""
    lines = (in_workdir / "data" / "pydoc" / "val.jsonl").read_text().splitlines(keepends=True)
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "a.jsonl").write_text("".join(lines))
    (evals / "b.jsonl").write_text("".join(lines[:3]))
    run_dir = tmp_path / "r"
    p = cli(
        "train",
        str(CONFIGS / "gpt-cpu-tiny.yaml"),
        f"run.dir={run_dir}",
        f"data.eval_path={evals}/*.jsonl",
        "train.eval_batches=20",
        "train.steps=4",
        "train.eval_every=2",
        "parallel.zero_stage=3",
        "checkpoint.at_end=false",
        "cluster.workers=2",
        ranks=2,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    evals_logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals_logged] == [2, 4] and all(r["eval_loss"] > 0 for r in evals_logged)


NAN_ON_RANK_1 = r"""
import dataclasses
import os
import sys
from typing import Literal

from pydantic import Field

from distrain import models
from distrain.config import load_config
from distrain.models import gpt
from distrain.train import run


class NanGPTConfig(gpt.GPTModelConfig):
    name: Literal["nangpt"] = Field("nangpt", description="gpt, its output NaN on rank 1 at steps 3 to 5.")


calls = [0]


def poison(module, args, out):  # rank 1's training forwards 3 to 5: NaN logits and loss
    if not module.training:
        return None
    calls[0] += 1
    if os.environ["RANK"] != "1" or not 3 <= calls[0] <= 5:
        return None
    return dataclasses.replace(out, logits=out.logits * float("nan"), loss=None if out.loss is None else out.loss * float("nan"))


def build(cfg):
    model = gpt.build(cfg)
    model.register_forward_hook(poison)
    return model


models.register(dataclasses.replace(gpt.SPEC, name="nangpt", config=NanGPTConfig, build=build))
run(load_config(sys.argv[1], [*sys.argv[2:], "model.name=nangpt"]))
"""

LLAMA_FP32 = [str(CONFIGS / "llama-cpu-tiny.yaml"), "parallel.precision=fp32", "model.vocab_size=258"]


@pytest.mark.world_size
@pytest.mark.parametrize(
    "stage, split",
    [
        (0, [str(CONFIGS / "gpt-cpu-tiny.yaml")]),
        pytest.param(2, [str(CONFIGS / "gpt-cpu-tiny.yaml")], marks=pytest.mark.slow),
        (1, [*LLAMA_FP32, "parallel.sequence_parallel=2"]),  # the group's loss, or a TP group's
        (1, [*LLAMA_FP32, "parallel.tensor_parallel=2"]),
    ],
    ids=["zero0", "zero2", "sp2", "tp2"],
)
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_all_and_names_the_rank(
    in_workdir, tmp_path, stage, split
):
    """Gradients are averaged over ranks, so one rank's NaN output makes every rank skip the step
    (the replicas stay identical); three in a row stop the run on both ranks, naming the ranks whose
    loss was NaN: rank 1, or under sequence parallelism both (the group shares one loss)."""
    sp = "parallel.sequence_parallel=2" in split
    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_RANK_1)
    run_dir = tmp_path / "r"
    p = subprocess.run(
        torchrun_cmd(
            str(script),
            *split,
            f"run.dir={run_dir}",
            "cluster.workers=2",
            "train.steps=10",
            "train.log_every=1",
            "train.eval_every=0",
            f"parallel.zero_stage={stage}",
            "checkpoint.at_end=false",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode != 0
    ranks = "[0, 1]" if sp else "[1]"
    msg = f"3 consecutive steps up to step 5 were skipped (non-finite loss on rank(s) {ranks})"
    assert p.stderr.count(msg) >= 2, p.stderr[-3000:]  # both ranks stop, at the same step
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in recs] == [0, 0, 1, 2]
    if sp:  # no rank's loss was finite at steps 3 and 4
        assert [r["loss"] is not None and r["loss"] > 0 for r in recs] == [True, True, False, False]
    else:
        assert all(r["loss"] is not None and r["loss"] > 0 for r in recs)  # rank 0's finite loss
