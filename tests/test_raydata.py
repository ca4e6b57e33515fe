"""data.engine=ray: Ray Data actors on a local Ray (loopback only) feed the same batches, resume
exactly, and report bad rows like the torch engine."""

from __future__ import annotations

import json

import pytest
import torch

from distrain.config import load_config
from distrain.data import DataError, DataPipeline
from distrain.train import run
from tests.conftest import CONFIGS, read_jsonl

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """Environment for a local Ray that never leaves loopback; Ray is stopped afterwards."""
    import os

    import ray

    from distrain.cluster.ray import loopback_env

    # proxies at a closed loopback port: Ray's cloud-metadata probes fail at once, nothing leaves
    env = {**loopback_env("127.0.0.2"), "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    yield
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) > 0 and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("name", ["gpt-cpu-tiny.yaml", "resnet-cpu-tiny.yaml"])
def test_ray_engine_resumes_exactly(in_workdir, local_ray, name):
    import ray

    cfg = load_config(
        CONFIGS / name, ["data.engine=ray", "train.micro_batch_size=4", "data.shuffle_block=16", "run.seed=5"]
    )
    first = DataPipeline(cfg)
    it = first.train_batches()
    _take(it, 5)
    state = first.state_dict()
    expected = _take(it, 6)
    first.close()
    resumed = DataPipeline(cfg)
    resumed.load_state_dict(state)
    assert _same(expected, _take(resumed.train_batches(), 6))
    resumed.close()
    assert all(n["NodeManagerAddress"].startswith("127.") for n in ray.nodes())  # Ray stayed on loopback


def test_ray_engine_images_match_the_torch_engine(in_workdir, local_ray):
    over = ["train.micro_batch_size=4", "run.seed=2"]
    torch_batches = _take(
        DataPipeline(load_config(CONFIGS / "resnet-cpu-tiny.yaml", over)).train_batches(), 3
    )
    ray_pipe = DataPipeline(load_config(CONFIGS / "resnet-cpu-tiny.yaml", [*over, "data.engine=ray"]))
    assert _same(torch_batches, _take(ray_pipe.train_batches(), 3))  # same order, same seeded augmentation
    ray_pipe.close()


def test_ray_engine_bad_rows_and_training(in_workdir, local_ray, tmp_path):
    good = [json.dumps({"text": f"good document {i} " * 20}) for i in range(60)]
    (tmp_path / "d.jsonl").write_text(
        "\n".join(good[:5] + ['{"text": oops', json.dumps({"x": 1})] + good[5:]) + "\n"
    )
    run_dir = tmp_path / "run"
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            "data.engine=ray",
            f"data.train_path={tmp_path / 'd.jsonl'}",
            "data.eval_path=null",
            "data.shuffle=false",
            f"run.dir={run_dir}",
            "train.steps=12",
            "train.log_every=4",
            "data.seq_len=64",
            "checkpoint.at_end=false",
        ],
    )
    summary = run(cfg)
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert summary["status"] == "completed" and recs[-1]["loss"] < recs[0]["loss"]
    assert (recs[-1]["data_skipped_malformed"], recs[-1]["data_skipped_missing_field"]) == (1, 1)
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            "data.engine=ray",
            f"data.train_path={tmp_path / 'd.jsonl'}",
            "data.shuffle=false",
            "data.on_error=fail",
        ],
    )
    pipe = DataPipeline(cfg)
    with pytest.raises(DataError, match=r"d.jsonl line 6: malformed JSON.*data.on_error=skip"):
        _take(pipe.train_batches(), 50)
    pipe.close()


def test_ray_engine_is_the_torch_engines_plan_mixed_sources_too(in_workdir, local_ray, tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name}{i} " * (3 + i % 7)}) + "\n" for i in range(200))
        )
    over = [
        f"data.sources=[{{path: {tmp_path / 'a.jsonl'}, weight: 3}}, {{path: {tmp_path / 'b.jsonl'}, weight: 1}}]",
        "data.train_path=null",
        "data.seq_len=32",
        "train.micro_batch_size=4",
        "run.seed=4",
    ]
    want = _take(DataPipeline(load_config(CONFIGS / "gpt-cpu-tiny.yaml", over)).train_batches(), 12)
    ray_pipe = DataPipeline(load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "data.engine=ray"]))
    first = _take(ray_pipe.train_batches(), 5)
    state = ray_pipe.state_dict()
    ray_pipe.close()
    assert _same(want[:5], first)
    # a Ray position continues on the torch engine, exactly
    torch_pipe = DataPipeline(load_config(CONFIGS / "gpt-cpu-tiny.yaml", over))
    torch_pipe.load_state_dict(state)
    assert _same(want[5:], _take(torch_pipe.train_batches(), 7))
