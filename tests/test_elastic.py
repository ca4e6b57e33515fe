"""Elastic Ray Train jobs: `cluster.workers: {min, max}`, a fixed global batch at every size, and a
job that shrinks when a node goes and grows when it returns, on a real two-node Ray cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrain.config import ConfigError, load_config, sized_for
from tests.conftest import CONFIGS, REPO, cli, cli_all, read_jsonl

TINY = CONFIGS / "gpt-cpu-tiny.yaml"


def test_a_range_keeps_the_global_batch_and_derives_grad_accum_per_size():
    cfg = load_config(TINY, ["cluster.workers={min: 1, max: 4}", "train.global_batch_size=96"])
    assert cfg.cluster.elastic and cfg.cluster.failures == -1  # a lost node is a restart
    assert [sized_for(cfg, n).parallel.grad_accum for n in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert load_config(TINY, ["cluster.workers=2"]).cluster.failures == 0
    # without train.global_batch_size: micro batch x grad_accum x the range's max, kept at every size
    cfg = load_config(TINY, ["cluster.workers={min: 1, max: 2}"])
    assert sized_for(cfg, 1).parallel.grad_accum == 2 and sized_for(cfg, 2).parallel.grad_accum == 1


def test_sizes_that_cannot_keep_the_global_batch_are_named_and_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["cluster.workers={min: 1, max: 4}"])
    msg = str(err.value)
    assert "3 workers cannot keep the global batch (32 samples are not micro batch 8" in msg
    assert "Sizes that work: 1, 2, 4;" in msg and "train.global_batch_size=96" in msg
    with pytest.raises(ConfigError, match="data.partitions=4 is not divisible by 3"):
        load_config(
            TINY, ["cluster.workers={min: 2, max: 3}", "train.global_batch_size=48", "data.partitions=4"]
        )
    with pytest.raises(ConfigError) as err:  # a 1,024-GPU range: the error stays short and says what to do
        load_config(TINY, ["cluster.workers={min: 512, max: 1024}", "train.global_batch_size=8192"])
    msg = str(err.value)
    assert "513 workers cannot keep" in msg and "(and 507 more sizes)" in msg and len(msg) < 1000
    assert "Sizes that work: 512, 1024;" in msg and "no global batch near this one fits every size" in msg
    with pytest.raises(ConfigError, match="min=3 is above max=2"):
        load_config(TINY, ["cluster.workers={min: 3, max: 2}"])
    # `config validate` prints the layout of every size
    out = cli("config", "validate", str(TINY), "cluster.workers={min: 1, max: 2}")
    assert out.returncode == 0, out.stderr
    assert (
        "global batch 16 at every size: 1 workers x micro batch 8 x grad_accum 2, "
        "2 workers x micro batch 8 x grad_accum 1" in out.stdout
    )
    out = cli("config", "validate", str(TINY), "cluster.workers={min: 1, max: 3}")
    assert out.returncode == 1 and "2 workers cannot keep the global batch" in out.stderr


def test_the_launch_dry_run_checks_every_size_against_the_data_and_writes_nothing(in_workdir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--dry-run", f"run.dir={run_dir}", "data.num_workers=0"]
    local = ["launch", "local", str(TINY), "--workers"]
    outs = cli_all(
        ("launch", "ray", str(TINY), "--workers", "1-2", "--dry-run", f"run.dir={run_dir}"),
        (*local, "2-4", "train.global_batch_size=96", *args),
        (*local, "5-8", "train.global_batch_size=6720", *args),
        (*local, "2-4", "train.global_batch_size=96", "data.partitions=4", *args),
        (*local, "two", "--dry-run"),
    )
    out = outs[0]
    assert out.returncode == 0, out.stderr
    assert (
        "ranks: 1, 2 (cluster.workers={min: 1, max: 2}); elastic: global batch 16 at every size" in out.stdout
    )
    assert "nothing written, nothing started" in out.stdout
    assert "plan: 0.1M parameters on 2 x H100" in out.stdout  # the plan at the range's max
    # data.partitions unset: derived for every size of the range. 2-4 needs a multiple of 12, and
    # this small corpus (72 rows, a chunk each) gets 12 rather than 192
    out = outs[1]
    assert out.returncode == 0, out.stderr
    assert "data: 12 partitions (derived for cluster.workers={min: 2, max: 4}) of 72 chunks" in out.stdout
    # 5-8 needs a multiple of 840: more partitions than the corpus has chunks
    out = outs[2]
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "needs a multiple of 840, but data.train_path has 72 rows in 72 chunks" in out.stderr
    # a fixed partition count that a size does not divide is refused naming the sizes that work
    out = outs[3]
    assert out.returncode == 1
    assert "3 workers cannot keep the global batch (data.partitions=4 is not divisible by 3)" in out.stderr
    assert "Sizes that work: 2, 4;" in out.stderr and "set data.partitions=12 (a multiple" in out.stderr
    out = outs[4]
    assert (
        out.returncode == 1
        and "--workers two: give a number of workers (4) or an elastic range" in out.stderr
    )
    assert not run_dir.exists()


def test_one_process_of_an_elastic_config_trains_with_the_grad_accum_of_its_size(in_workdir, tmp_path):
    run_dir = tmp_path / "run"
    out = cli(
        "train",
        str(TINY),
        "cluster.workers={min: 1, max: 2}",
        f"run.dir={run_dir}",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["world_size"], r["grad_accum"]) for r in recs] == [(1, 1, 2), (2, 1, 2)]
    assert json.loads((run_dir / "summary.json").read_text())["samples_seen"] == 32  # 16 a step


def test_a_resize_notice_stops_the_group_that_was_running_not_the_next_one(tmp_path, monkeypatch):
    from distrain import notices
    from distrain.cluster.control import write_notice

    monkeypatch.setenv(notices.LAUNCH_ID, "a" * 16)
    monkeypatch.delenv(notices.DEADLINE, raising=False)
    running = notices.StopWatch(tmp_path)
    write_notice(tmp_path, "a" * 16, notices.RESIZE)
    running._next = 0.0
    assert running.check() == "resize"
    after = notices.StopWatch(tmp_path)  # the group Ray starts after the resize finds the notice there
    assert after.check() is None
    write_notice(tmp_path, "a" * 16, notices.RESIZE)  # the next resize
    after._next = 0.0
    assert after.check() == "resize"
    write_notice(tmp_path, "a" * 16, "SIGUSR1")  # a preemption notice of the launch: always
    assert notices.StopWatch(tmp_path).check() == "preempted"


def _positions(ckpt: Path) -> tuple[set[int], dict]:
    """(the cursors, every partition's position) over the rank files of a checkpoint."""
    cursors, parts = set(), {}
    for f in sorted(ckpt.glob("rank-*.pt")):
        data = torch.load(f, map_location="cpu", weights_only=True)["data"]
        cursors.add(data["cursor"])
        parts.update(data["partitions"])
    return cursors, parts


@pytest.mark.ray
@pytest.mark.world_size
@pytest.mark.slow
def test_an_elastic_job_shrinks_when_a_node_goes_grows_when_it_returns_and_matches_a_fixed_run(
    in_workdir, tmp_path
):
    """A head and a worker node (one CPU each); the job runs `{min: 1, max: 2}` under ZeRO 2 (the
    universal conversion at every resize). The worker node is stopped by its pid while the job trains
    on two workers, started again once it trains on one; the job completes. Against one process with
    the same global batch (grad_accum 2): the same loss at every step within float summation, the same
    data position at the end; every step once in metrics.jsonl with its world size; one W&B run."""
    steps, stage = 700, 2
    out = tmp_path / "drill.json"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_elastic.py"),
            "--steps",
            str(steps),
            "--out",
            str(tmp_path / "el"),
            "--json",
            str(out),
            f"parallel.zero_stage={stage}",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    res = json.loads(out.read_text())
    run_dir = Path(res["run_dir"])
    assert res["rc"] == 0, (tmp_path / "el" / "launch.log").read_text()[-5000:]
    assert res["shrink_lost_steps"] == 0 and res["grow_lost_steps"] == 0  # saved before each resize
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    sizes = [r["world_size"] for r in recs]
    changes = [(a, b) for a, b in zip(sizes, sizes[1:], strict=False) if a != b]
    assert sizes[0] == 2 and changes == [(2, 1), (1, 2)], changes
    assert {(r["world_size"], r["grad_accum"]) for r in recs} == {(2, 1), (1, 2)}
    log = (tmp_path / "el" / "launch.log").read_text()
    converted = set(re.findall(r"(step\d+) was saved by (\d+) workers and this run has (\d+)", log))
    assert sorted((a, b) for _, a, b in converted) == [("1", "2"), ("2", "1")], converted  # each resize
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["samples_seen"] == 16 * steps
    ids = {d.name.rsplit("-", 1)[1] for d in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 3

    one = tmp_path / "one"
    data = tmp_path / "el" / "data"
    p = cli(
        "train",
        str(TINY),
        f"run.dir={one}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "optim.warmup_steps=0",
        "checkpoint.every_steps=20",
        "checkpoint.at_end=false",
        f"parallel.zero_stage={stage}",
        "parallel.grad_accum=2",
        f"data.train_path={data}/pydoc/train-*.jsonl",
        f"data.eval_path={data}/pydoc/val.jsonl",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    fixed = [r["loss"] for r in read_jsonl(one / "metrics.jsonl") if "loss" in r]
    assert len(fixed) == steps
    # the same global batches, only split differently: float summation in another order, whose
    # difference compounds over the steps (measured: 1e-7 at the start, a few 1e-5 by step 100, at
    # most 2.5e-4 by step 700, with no jump at a resize); batches that differed would be ~1e-1 apart
    diff = [abs(a["loss"] - b) / b for a, b in zip(recs, fixed, strict=True)]
    assert max(diff[:50]) < 1e-4 and max(diff) < 1e-3, (max(diff[:50]), max(diff))
    for s in range(1, steps):  # no step after a resize is further off than the run already was
        if sizes[s] != sizes[s - 1]:
            assert diff[s] < 2 * max(diff[:s]) + 1e-6, (s + 1, diff[s], max(diff[:s]))
    tag = f"step{steps:08d}"
    cursors, parts = _positions(run_dir / "checkpoints" / tag)
    assert cursors == _positions(one / "checkpoints" / tag)[0] == {16 * steps}
    assert parts == _positions(one / "checkpoints" / tag)[1]  # every partition where the fixed run's is


def test_ray_controller_hook_saves_before_a_resize_and_only_notifies_on_a_drain(tmp_path, monkeypatch):
    """``ResizeSaves`` in Ray's controller: Running -> Resizing writes a resize notice and returns once
    the workers' checkpoint is `latest`; Running -> Preempting (a drain) only writes the notice; a
    group that never saves is resized anyway after cluster.resize_save_timeout_s."""
    import threading
    import time

    from distrain import notices
    from distrain.cluster.ray import CONTROLLER_STATES, _resize_callback

    # instances of the real Ray Train controller states (their fields are not read)
    states = {n: cls.__new__(cls) for n, cls in CONTROLLER_STATES.items()}
    (tmp_path / "checkpoints").mkdir()
    latest = tmp_path / "checkpoints" / "latest"
    latest.write_text("step00000020")
    hook = _resize_callback(tmp_path, "a" * 16, 30.0)
    monkeypatch.setenv(notices.LAUNCH_ID, "a" * 16)
    workers = notices.StopWatch(tmp_path)

    def save_when_told():  # rank 0: sees the notice, saves; `latest` moves last
        while workers.check() != "resize":
            workers._next = 0.0
            time.sleep(0.05)
        time.sleep(0.3)
        latest.write_text("step00000027")

    t = threading.Thread(target=save_when_told)
    t.start()
    t0 = time.time()
    hook.after_controller_state_update(states["RunningState"], states["ResizingState"])
    t.join()
    assert latest.read_text() == "step00000027" and 0.3 <= time.time() - t0 < 10

    t0 = time.time()
    hook.after_controller_state_update(states["RunningState"], states["PreemptingState"])
    assert time.time() - t0 < 1  # a drain: Ray keeps the group running until the workers end
    notice = json.loads(notices.notice_path(tmp_path).read_text())
    assert notice["reason"] == notices.RESIZE and notice["launch"] == "a" * 16
    hook.after_controller_state_update(states["ResizingState"], states["RunningState"])  # not a resize
    assert json.loads(notices.notice_path(tmp_path).read_text()) == notice

    slow = _resize_callback(tmp_path, "a" * 16, 0.5)
    t0 = time.time()
    slow.after_controller_state_update(states["RunningState"], states["ResizingState"])
    assert 0.5 <= time.time() - t0 < 5  # no save came: resized anyway, from the last checkpoint


def test_ray_private_surface_is_read_from_the_installed_ray():
    """Elastic saves stand on Ray Train internals (the controller callback's hook and the controller
    states); they are read from the real Ray, and pyproject.toml bounds Ray to the tested minor."""
    import inspect
    import re

    import ray
    from packaging.specifiers import SpecifierSet
    from ray.train.v2._internal.execution.controller.state import TrainControllerState

    from distrain.cluster.ray import (
        CALLBACK,
        CONTROLLER_STATES,
        STATES,
        TESTED_RAY,
        ControllerCallback,
        RayVersionError,
        ray_surface,
    )

    assert set(CONTROLLER_STATES) == set(STATES[1])
    assert all(issubclass(c, TrainControllerState) for c in CONTROLLER_STATES.values())
    hook = inspect.signature(getattr(ControllerCallback, CALLBACK[2]))
    assert list(hook.parameters) == ["self", "previous_state", "current_state"]
    (dep,) = re.findall(r'"ray\[[a-z,]+\]([^"]+)"', (REPO / "pyproject.toml").read_text())
    bound = SpecifierSet(dep)
    assert ray.__version__ in bound and f"{TESTED_RAY}.0" in bound and f"{TESTED_RAY}.99" in bound
    assert "2.61.0" not in bound  # a minor that is not tested is not installed
    with pytest.raises(
        RayVersionError, match=r"lacks .*GoneState.* pip install 'ray\[train,data,default\]==2\.60\.\*'"
    ):
        ray_surface(states=(STATES[0], ("RunningState", "GoneState")))
