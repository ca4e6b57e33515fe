"""A launch's layout is decided in the driver before anything starts: data.partitions derived from
every world size the run may use and recorded with the run, and every check that can refuse a
launch run before Ray, sbatch or the process group starts (one line naming the key, exit 1)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import CONFIGS, cli, cli_all, read_jsonl

TINY = CONFIGS / "gpt-cpu-tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A generated text corpus of 20,000 documents in one parquet file (a chunk a row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("corpus") / "train.parquet"
    rows = [{"text": f"document {i}: " + "words of a document " * (i % 7 + 1)} for i in range(20_000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500)
    return str(path)


def test_the_default_partitions_fit_every_size_and_small_data_gets_fewer(corpus, in_workdir):
    from distrain.data.plan import default_partitions
    from distrain.data.sources import DataError, build_manifest

    big = [build_manifest(corpus, "parquet", "data.train_path")]
    # the smallest multiple of 64 that every size divides
    assert [default_partitions(big, [n]) for n in (1, 2, 3, 6, 8, 24, 96, 1024)] == [
        64, 64, 192, 192, 64, 192, 192, 1024,
    ]  # fmt: skip
    assert default_partitions(big, [2, 3, 4]) == 192  # an elastic range 2-4
    assert all(192 % n == 0 for n in (8, 12, 24, 48))  # 24 GPUs resume on 8, 12, 24 or 48
    small = [build_manifest("data/pydoc/train-*.jsonl", "jsonl", "data.train_path")]  # 72 rows
    assert [default_partitions(small, [n]) for n in (1, 2, 3, 6, 24)] == [4, 4, 3, 6, 24]
    with pytest.raises(
        DataError, match=r"needs a multiple of 100, but data.train_path has 72 rows in 72 chunks"
    ):
        default_partitions(small, [100], "cluster.workers=100")


@pytest.mark.parametrize("workers,parts", [(3, 192), (6, 192), (24, 192), (1024, 1024)])
def test_cluster_sizes_are_accepted_by_default(corpus, in_workdir, tmp_path, workers, parts):
    run_dir = tmp_path / "r"
    out = cli(
        "launch", "ray", TINY, "--workers", workers, "--dry-run", f"run.dir={run_dir}",
        f"data.train_path={corpus}", "data.eval_path=null",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"data: {parts} partitions (derived for cluster.workers={workers})" in out.stdout
    assert f"{parts // workers} partition(s) and ~{20_000 // workers:,} rows a rank" in out.stdout
    assert "nothing written, nothing started" in out.stdout and not run_dir.exists()
    if workers == 1024:  # the plan prints the data layout too
        plan = cli("plan", TINY, "--gpus", workers, f"data.train_path={corpus}")
        assert (
            plan.returncode == 0 and f"data: {parts} partitions (derived for --gpus {workers})" in plan.stdout
        )


def test_refusals_come_from_the_driver_in_one_line_before_anything_starts(in_workdir, tmp_path):
    run_dir = tmp_path / "r"
    cases = [
        (["launch", "local", TINY, "--workers", "100"], "data.partitions: every world size the run may use"),
        (
            ["launch", "local", TINY, "--workers", "2", "data.partitions=3"],
            "data.partitions=3 is not divisible",
        ),
        (["launch", "local", TINY, "data.eval_path=data/nope.jsonl"], "data.eval_path: no data files"),
        (["train", TINY, "data.train_path=data/nope/*.jsonl"], "data.train_path: no data files"),
        (
            ["train", TINY, "model.init_from=nope.safetensors"],
            "model.init_from=nope.safetensors: no such file",
        ),
        (
            ["launch", "local", CONFIGS / "resnet-cpu-tiny.yaml", "model.num_classes=5"],
            "has 10 classes but model.num_classes=5",
        ),
        (
            ["submit", "slurm", TINY, "--nodes", "2", "data.partitions=3"],
            "data.partitions=3 is not divisible",
        ),
        (
            ["submit", "slurm", TINY, "--dry-run", "data.train_path=nope/*.jsonl"],
            "data.train_path: no data files",
        ),
    ]
    outs = cli_all(*[(*args, f"run.dir={run_dir}") for args, _ in cases])
    for (args, msg), out in zip(cases, outs, strict=True):
        assert out.returncode == 1, (args, out.stdout[-2000:], out.stderr[-2000:])
        errors = [ln for ln in out.stderr.splitlines() if "distrain: error" in ln]
        assert len(errors) == 1 and msg in errors[0], (args, out.stderr[-2000:])
        assert not run_dir.exists(), args  # nothing written, no RUN_DIR/ray
    # under torchrun every rank checks before the process group forms, and rank 0 says it once
    p = cli(
        "train", TINY, f"run.dir={run_dir}", "cluster.workers=2", "data.partitions=3", ranks=2, timeout=300
    )
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if "distrain: error" in ln]
    assert len(errors) == 1 and "data.partitions=3 is not divisible by the world size 2" in errors[0], (
        p.stderr
    )
    assert "Traceback" not in p.stderr.split("distrain: error")[0] and not run_dir.exists()


@pytest.mark.ray
@pytest.mark.world_size
def test_three_ray_workers_train_by_default_and_the_partitions_stay_with_the_run(
    in_workdir, tmp_path, ray_env
):
    """The shipped tiny config on 3 Ray workers (its 72-row corpus gets 3 partitions); a resume
    keeps them: 1 process continues the run, 2 ranks are refused before anything starts."""
    run_dir = tmp_path / "r"
    common = ["train.log_every=1", "train.eval_every=0", f"run.dir={run_dir}"]
    out = cli("launch", "local", TINY, "--workers", "3", "train.steps=4", *common, env=ray_env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["partitions"] == 3
    st = json.loads(cli("status", run_dir, "--json").stdout)
    assert (st["state"], st["step"], st["checkpoint"]) == ("completed", 4, "step00000004")
    out = cli("launch", "local", TINY, "--workers", "2", "train.steps=8", "--dry-run", *common)
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "data.partitions=3 was fixed at the run's first launch" in out.stderr
    assert "this run resumes on 1, 3 ranks" in out.stderr
    out = cli("train", TINY, "train.steps=8", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))  # resumed at step 4 on one process, every step once
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["partitions"] == 3
