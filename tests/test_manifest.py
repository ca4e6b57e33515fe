"""Manifests and reads at scale: files indexed once (cached by path, size and mtime), every file read
front to back once per pass, a changed corpus refused on resume with the file named, and Hugging
Face ``datasets`` (save_to_disk directories, the local cache) as a source read through the same plan."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.config import load_config
from distrain.data import DataError, DataPipeline
from distrain.data import sources as src
from distrain.data.plan import PartitionRows, Plan
from distrain.train import run
from tests.conftest import CONFIGS, cli, read_jsonl


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def _jsonl(path, n, start=0):
    path.write_text(
        "".join(json.dumps({"text": f"row {i} " + "w" * (i % 50)}) + "\n" for i in range(start, start + n))
    )


def test_jsonl_manifest_seeks_and_its_cache(tmp_path, monkeypatch):
    small = tmp_path / "small.jsonl"
    _jsonl(small, 100)
    info = src.build_manifest(str(small), "jsonl", "data.train_path").files[0]
    assert (info.rows, info.stride, info.n_chunks, len(info.offsets)) == (100, 1, 100, 100)
    f = tmp_path / "big.jsonl"
    n = src.SMALL_FILE_ROWS + 3 * src.JSONL_STRIDE + 17
    _jsonl(f, n)
    man = src.build_manifest(str(f), "jsonl", "data.train_path")
    info = man.files[0]
    assert (info.rows, info.stride) == (n, src.JSONL_STRIDE) and len(info.offsets) == info.n_chunks == 68
    # a read from any row seeks to the indexed offset before it: the rows are the file's own
    lines = f.read_text().splitlines()
    for start in (0, 5, src.JSONL_STRIDE, 2 * src.JSONL_STRIDE + 3, 67 * src.JSONL_STRIDE, n - 1):
        (row,) = src.make_rows(man, [0], [start], next(src.iter_raw(man, 0, start))[:1])
        assert row.index == start and row.value == json.loads(lines[start])
    with open(f, "rb") as fh:  # each offset is where its line starts
        data = fh.read()
    assert all(data[o - 1 : o] == b"\n" for o in info.offsets[1:])
    # the index is cached: a second manifest does not read the file ...
    calls = []
    real = src._count_jsonl
    monkeypatch.setattr(src, "_count_jsonl", lambda *a: calls.append(a) or real(*a))
    assert src.build_manifest(str(f), "jsonl", "data.train_path").digest == man.digest and not calls
    # ... until it changes
    _jsonl(f, 10)
    again = src.build_manifest(str(f), "jsonl", "data.train_path")
    assert len(calls) == 1 and again.files[0].rows == 10 and again.digest != man.digest


def test_jsonl_lines_parse_like_json_loads_and_bad_ones_are_named(tmp_path):
    f = tmp_path / "mixed.jsonl"
    lines = [
        b'{"text": "plain"}\n',
        b'  {"text": "indented"}\r\n',
        '\ufeff{"text": "bom"}\n'.encode(),
        b'{"text": "trailing"} junk\n',
        b"[1, 2]\n",
        b'{"text": "\xff"}\n',
        b"\n",
    ]
    f.write_bytes(b"".join(lines))
    man = src.build_manifest(str(f), "jsonl", "data.train_path")
    raws = [r for run in src.iter_raw(man, 0) for r in run]
    rows = list(src.make_rows(man, [0] * len(raws), list(range(len(raws))), raws))
    assert [r.value for r in rows[:3]] == [{"text": "plain"}, {"text": "indented"}, {"text": "bom"}]
    errors = [r.error for r in rows[3:]]
    assert errors[0].startswith("malformed JSON (Extra data")
    assert errors[1] == "a JSON list, not an object"
    assert errors[2].startswith("malformed JSON ('utf-8' codec can't decode")
    assert errors[3].startswith("malformed JSON (Expecting value")
    assert rows[5].where == f"{f} line 6"


def test_a_pass_opens_each_file_once_and_reads_it_front_to_back(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _jsonl(tmp_path / "a.jsonl", 3000)
    pq.write_table(
        pa.table({"text": [f"p{i}" for i in range(3000)]}), tmp_path / "b.parquet", row_group_size=500
    )
    import pyarrow.parquet as pq_module

    opened = []
    real_open, real_pf = src.open_file, pq_module.ParquetFile

    def open_file(path):
        opened.append(path.rsplit("/", 1)[-1])
        return real_open(path)

    def parquet_file(f, *a, **k):
        opened.append(str(f).rsplit("/", 1)[-1])
        return real_pf(f, *a, **k)

    monkeypatch.setattr(src, "open_file", open_file)
    monkeypatch.setattr(pq_module, "ParquetFile", parquet_file)
    for name, fmt in (("a.jsonl", "jsonl"), ("b.parquet", "parquet")):
        man = src.build_manifest(str(tmp_path / name), fmt, "data.train_path")
        for shuffle in (False, True):
            opened.clear()
            rows = []
            cur = PartitionRows(Plan([man], [1.0], 0, 1, 64, shuffle), 0, 0, loop=False)
            while got := cur.rows(1):
                rows.extend(r.index for r in got)
            assert sorted(rows) == list(range(3000))
            assert opened == [name], opened  # one open for the whole pass, no re-open to skip rows
            if shuffle:  # rows permuted within blocks of 64, blocks in file order
                assert rows != sorted(rows) and all(
                    sorted(rows[b : b + 64]) == list(range(b, min(b + 64, 3000))) for b in range(0, 3000, 64)
                )


def test_a_changed_corpus_is_refused_on_resume_with_the_file_named(in_workdir, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(3):
        _jsonl(data / f"part-{i}.jsonl", 40, start=100 * i)
    run_dir = tmp_path / "run"
    over = [
        f"data.train_path={data}/*.jsonl",
        "data.eval_path=null",
        f"run.dir={run_dir}",
        "train.steps=4",
        "checkpoint.every_steps=4",
        "data.seq_len=32",
    ]
    run(load_config(CONFIGS / "gpt-cpu-tiny.yaml", over))
    state = torch.load(run_dir / "checkpoints" / "step00000004" / "distrain-state.pt", weights_only=True)
    saved = state["corpus"]["sources"][0]
    assert [f[0] for f in saved["files"]] == [f"part-{i}.jsonl" for i in range(3)] and len(
        saved["digest"]
    ) == 32
    rank = torch.load(run_dir / "checkpoints" / "step00000004" / "rank-00000.pt", weights_only=True)["data"]
    assert rank["plan"]["digests"] == [saved["digest"]] and rank["cursor"] == 4 * 8
    before = sorted(p.name for p in run_dir.iterdir())
    _jsonl(data / "part-1.jsonl", 41, start=100)
    longer = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "train.steps=8"])
    with pytest.raises(DataError, match=r"part-1.jsonl changed since the checkpoint \(40 rows.*-> 41 rows"):
        run(longer)
    _jsonl(data / "part-1.jsonl", 40, start=100)
    _jsonl(data / "part-3.jsonl", 5)
    with pytest.raises(DataError, match=r"part-3.jsonl is new since the checkpoint"):
        run(longer)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written by a refused resume
    (data / "part-3.jsonl").unlink()
    assert run(longer)["status"] == "completed"  # the original corpus resumes
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 8


def test_a_position_this_code_cannot_continue_refuses_the_resume_or_restarts_the_order(
    in_workdir, tmp_path, monkeypatch
):
    """Never a silent restart: a data position saved by another data-state version (or for changed
    data) refuses the resume, naming why; data.restart_order=true restarts the data order at the
    start of the epoch it had reached, and summary.json and the next checkpoint record it."""
    import distrain.data

    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(3):
        _jsonl(data / f"part-{i}.jsonl", 40, start=100 * i)
    run_dir = tmp_path / "run"
    over = [f"data.train_path={data}/*.jsonl", "data.eval_path=null", f"run.dir={run_dir}", "data.seq_len=32"]
    run(load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "train.steps=4"]))
    monkeypatch.setattr(distrain.data, "STATE_VERSION", distrain.data.STATE_VERSION + 1)  # a later distrain
    longer = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "train.steps=8"])
    with pytest.raises(
        DataError,
        match=r"cannot be continued: it was saved by data-state version 2, this distrain reads 3.*data.restart_order=true",
    ):
        run(longer)
    assert not (run_dir / "checkpoints" / "step00000008").exists()
    summary = run(
        load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "train.steps=8", "data.restart_order=true"])
    )
    assert summary["status"] == "completed"
    assert summary["data_restarts"] == [
        {"epoch": 0, "why": "it was saved by data-state version 2, this distrain reads 3"}
    ]
    saved = torch.load(run_dir / "checkpoints" / "step00000008" / "rank-00000.pt", weights_only=True)["data"]
    assert (
        saved["restarts"] == summary["data_restarts"] and saved["cursor"] == 4 * 8
    )  # 4 steps since the restart
    assert json.loads((run_dir / "summary.json").read_text())["data_restarts"] == summary["data_restarts"]
    # (this code still reads the later version) changed data: refused naming the file and the key
    # that would restart the order
    _jsonl(data / "part-3.jsonl", 5)
    evenlonger = [*over, "train.steps=10"]
    with pytest.raises(DataError, match=r"part-3.jsonl is new since the checkpoint.*data.restart_order=true"):
        run(load_config(CONFIGS / "gpt-cpu-tiny.yaml", evenlonger))
    summary = run(load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*evenlonger, "data.restart_order=true"]))
    assert summary["status"] == "completed" and len(summary["data_restarts"]) == 2
    assert summary["data_restarts"][1]["why"].startswith("the training data changed")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_hf_datasets_save_to_disk_and_local_cache(in_workdir, tmp_path, monkeypatch):
    import datasets

    texts = [f"<doc {i}> " + "q" * (i % 40) for i in range(300)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "text_ds"))
    labels = [i % 3 for i in range(120)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    images = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(60 * lab + 10), "path": None} for lab in labels], "label": labels},
        features=feats,
    )
    datasets.DatasetDict(
        {"train": images, "validation": images.select(range(40)).flatten_indices()}
    ).save_to_disk(str(tmp_path / "img_ds"))
    base = ["data.eval_path=null", "train.steps=6", "checkpoint.at_end=false", f"run.dir={tmp_path / 'run'}"]
    # text: the same plan as any source (partitions over the Arrow rows), resumable, trains
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml", [*base, f"data.train_path={tmp_path / 'text_ds'}", "data.seq_len=32"]
    )
    pipe = DataPipeline(cfg)
    assert pipe.manifests[0].fmt == "hf" and pipe.manifests[0].total == 300
    it = pipe.train_batches()
    first = [next(it) for _ in range(3)]
    state = pipe.state_dict()
    more = [next(it) for _ in range(3)]
    pipe.close()
    text = bytes(int(i) for b in first + more for i in b["input_ids"].flatten() if i < 256).decode()
    assert "<doc " in text and set(text) <= set("".join(texts) + " ")
    resumed = DataPipeline(cfg)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(more, [next(resumed.train_batches()) for _ in range(3)], strict=True)
    )
    resumed.close()
    recs_run = run(cfg)
    assert recs_run["status"] == "completed"
    # images from a DatasetDict: HF Image() structs and ClassLabel labels, train and validation splits
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [
            *base,
            f"data.train_path={tmp_path / 'img_ds'}",
            f"data.eval_path={tmp_path / 'img_ds'}",
            "train.micro_batch_size=8",
        ],
    )
    pipe = DataPipeline(cfg)
    batch = next(pipe.train_batches())
    from distrain.data.vision import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image, label in zip(batch["images"], batch["labels"].tolist(), strict=True):
        torch.testing.assert_close(image, (((60 * label + 10) / 255 - mean) / std).expand_as(image))
    assert len(pipe.eval_batches()) == 5  # 40 validation rows in batches of 8
    pipe.close()
    with pytest.raises(DataError, match=r"has splits \['train', 'validation'\], not 'test'"):
        DataPipeline(
            load_config(
                CONFIGS / "resnet-cpu-tiny.yaml",
                [*base, f"data.train_path={tmp_path / 'img_ds'}", "data.split=test"],
            )
        )
    # a dataset in the local HF cache, loaded offline (here: parquet files that load_dataset cached)
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"text": texts}), raw / "train.parquet")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    cached = datasets.load_dataset(str(raw), split="train", cache_dir=str(tmp_path / "hf_cache"))
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [*base, f"data.train_path={raw}", "data.format=hf", "data.seq_len=32"],
    )
    pipe = DataPipeline(cfg)
    files = [f.path for f in pipe.manifests[0].files]
    assert files == [f["filename"] for f in cached.cache_files] and all(
        str(tmp_path / "hf_cache") in f for f in files
    )
    assert next(pipe.train_batches())["input_ids"].shape == (8, 32)
    pipe.close()


def test_partitions_fall_on_row_groups_of_large_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = src.SMALL_FILE_ROWS + 4_464  # 70,000 rows: a large file, partitioned by its row groups
    for f in range(2):
        pq.write_table(
            pa.table({"text": [str(i) for i in range(n)]}), tmp_path / f"p{f}.parquet", row_group_size=10_000
        )
    man = src.build_manifest(f"{tmp_path}/*.parquet", "parquet", "data.train_path")
    assert [f.stride for f in man.files] == [None, None] and list(man.chunks) == [7, 7]
    plan = Plan([man], [1.0], 5, 4, 1024, True)
    for epoch in range(2):
        bounds = [plan.bounds(0, epoch, p) for p in range(4)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 2 * n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous, disjoint
        group_starts = {0, n, 2 * n} | {k * 10_000 for k in range(7)} | {n + k * 10_000 for k in range(7)}
        assert all(lo in group_starts for lo, _ in bounds)  # no row group is split between two partitions
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 10_000  # equal up to one row group


def test_data_index_command_fills_the_cache(tmp_path):
    import os

    for i in range(2):
        _jsonl(tmp_path / f"c{i}.jsonl", 30)
    env = {**os.environ, "DISTRAIN_CACHE_DIR": str(tmp_path / "cache")}
    p = cli("data", "index", f"{tmp_path}/*.jsonl", env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    man = src.build_manifest(f"{tmp_path}/*.jsonl", "jsonl", "k")
    assert f"jsonl, 2 files, 60 rows, 60 chunks, digest {man.digest}" in p.stdout
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


@pytest.mark.parametrize("chosen", [None, "system"])
def test_parquet_reads_use_jemalloc_unless_the_user_chose_an_arrow_pool(tmp_path, chosen):
    """Arrow's default pool (mimalloc) can make the first reads of every open parquet reader slow;
    importing distrain makes jemalloc the pool of the process and of the C++ parquet reader (before
    pyarrow loads), and leaves a pool the user set alone."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [str(i) for i in range(100)]}), tmp_path / "p.parquet")
    code = (
        "from distrain.data import sources as src\n"
        "import pyarrow as pa\n"
        f"man = src.build_manifest({str(tmp_path / 'p.parquet')!r}, 'parquet', 'data.train_path')\n"
        "rows = sum(b.num_rows for b in src.iter_raw(man, 0, 0, ['text']))\n"
        "print(rows, pa.default_memory_pool().backend_name, pa.jemalloc_memory_pool().max_memory() > 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    env["DISTRAIN_CACHE_DIR"] = str(tmp_path / "cache")
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    # the parquet reader's own buffers came from jemalloc only when it is the pool
    assert p.stdout.split("\n")[0] == ("100 system False" if chosen else "100 jemalloc True")
