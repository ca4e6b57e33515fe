"""The streaming pipeline: every row once per epoch over any world size, exact resume with shuffling
on, weighted sources, fsspec URLs, bad rows skipped and counted."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.config import load_config
from distrain.data import DataError, DataPipeline
from distrain.data.sources import resolve_files
from distrain.data.text import RowCursor
from distrain.train import run
from tests.conftest import CONFIGS, read_jsonl


def _uneven_jsonl(tmp_path, n_files: int) -> tuple[list[str], set[tuple[str, int]]]:
    files, rows = [], set()
    for f in range(n_files):
        p = tmp_path / f"part-{f:02d}.jsonl"
        n = 3 + 7 * f  # uneven sizes
        p.write_text("".join(json.dumps({"text": f"file {f} row {i}"}) + "\n" for i in range(n)))
        files.append(str(p))
        rows |= {(str(p), i) for i in range(n)}
    return files, rows


@pytest.mark.parametrize("n_files", [4, 5])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_once_per_epoch_over_ranks(tmp_path, n_files, world):
    files, all_rows = _uneven_jsonl(tmp_path, n_files)
    seen = []
    for shard in range(world):
        cur = RowCursor(files, "jsonl", shard, world, seed=3, shuffle=True, block=5, loop=False)
        while (row := cur.next_row()) is not None:
            seen.append((row.file, row.index))
    assert len(seen) == len(set(seen)), "a row was read twice"
    assert set(seen) == all_rows


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("model", ["gpt", "resnet"])
def test_resume_gives_the_same_batches_as_an_uninterrupted_run(in_workdir, model, workers):
    name = {"gpt": "gpt-cpu-tiny.yaml", "resnet": "resnet-cpu-tiny.yaml"}[model]
    over = [
        f"data.num_workers={workers}",
        "data.shuffle=true",
        "data.shuffle_block=16",
        "train.micro_batch_size=4",
        "run.seed=11",
    ]
    if model == "resnet":
        over.append("data.augment=true")
    cfg = load_config(CONFIGS / name, over)
    k, m = 7, 9
    first = DataPipeline(cfg)
    it = first.train_batches()
    _take(it, k)
    state = first.state_dict()
    expected = _take(it, m)
    resumed = DataPipeline(cfg)
    resumed.load_state_dict(state)
    got = _take(resumed.train_batches(), m)
    assert _same(expected, got)
    # and a pipeline restarted from scratch does not: shuffling and augmentation are really on
    assert not _same(expected, _take(DataPipeline(cfg).train_batches(), m))
    # a position taken with another layout is refused, not silently misapplied
    other = DataPipeline(load_config(CONFIGS / name, [*over[1:], f"data.num_workers={1 - workers // 2}"]))
    with pytest.raises(
        DataError, match="saved data position was taken with world size 1.*resume with the same layout"
    ):
        other.load_state_dict(state)


def test_text_resume_inside_a_long_document(tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"text": "a" * 5000}) + "\n" + json.dumps({"text": "b" * 3000}) + "\n")
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml", [f"data.train_path={p}", "data.seq_len=64", "train.micro_batch_size=2"]
    )
    a = DataPipeline(cfg)
    it = a.train_batches()
    _take(it, 20)  # 20 x 2 x 64 = 2560 tokens: in the middle of the first document
    state = a.state_dict()
    expected = _take(it, 60)  # crosses into the second document and the next epoch
    b = DataPipeline(cfg)
    b.load_state_dict(state)
    assert _same(expected, _take(b.train_batches(), 60))


def test_weighted_sources_mix_by_weight(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name}{i} " * 3}) + "\n" for i in range(400))
        )
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            f"data.sources=[{{path: {tmp_path / 'a.jsonl'}, weight: 3}}, {{path: {tmp_path / 'b.jsonl'}, weight: 1}}]",
            "data.train_path=null",
            "data.seq_len=32",
            "train.micro_batch_size=8",
        ],
    )
    pipe = DataPipeline(cfg)
    ids = torch.cat([b["input_ids"].flatten() for b in _take(pipe.train_batches(), 60)]).numpy()
    docs = bytes(int(i) if i < 256 else 10 for i in ids).decode().split("\n")[1:-1]
    share_a = sum(d.startswith("a") for d in docs) / len(docs)
    assert 0.68 < share_a < 0.82, share_a


def test_fsspec_urls_memory_and_file(tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    mem = fsspec.filesystem("memory")
    with mem.open("/corpus/a.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": f"memory doc {i}"}) + "\n" for i in range(50)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(50)]}), buf)
    with mem.open("/corpus/b.parquet", "wb") as f:
        f.write(buf.getvalue())
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": f"file doc {i}"}) + "\n" for i in range(50))
    )
    assert resolve_files("memory://corpus/*.jsonl", "k") == ["memory:///corpus/a.jsonl"]
    for path in ("memory://corpus/*.jsonl", "memory://corpus/b.parquet", f"file://{tmp_path}/c.jsonl"):
        cfg = load_config(
            CONFIGS / "gpt-cpu-tiny.yaml",
            [f"data.train_path={path}", "data.seq_len=16", "train.micro_batch_size=2"],
        )
        b = next(DataPipeline(cfg).train_batches())
        assert (
            b["input_ids"].shape == (2, 16)
            and "doc" in bytes(int(i) for i in b["input_ids"][0] if i < 256).decode()
        )


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def test_bad_rows_are_skipped_counted_and_named(in_workdir, tmp_path):
    good = [json.dumps({"text": f"good document {i} " * 20}) for i in range(40)]
    bad = ['{"text": broken', json.dumps({"body": "no text field"}), json.dumps({"text": ""})]
    (tmp_path / "d.jsonl").write_text("\n".join(good[:10] + bad + good[10:]) + "\n")
    run_dir = tmp_path / "run"
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            f"data.train_path={tmp_path / 'd.jsonl'}",
            "data.eval_path=null",
            f"run.dir={run_dir}",
            "train.steps=12",
            "train.log_every=4",
            "data.seq_len=64",
            "checkpoint.at_end=false",
            "data.shuffle=false",
        ],
    )
    run(cfg)
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert (
        last["data_skipped_malformed"],
        last["data_skipped_missing_field"],
        last["data_skipped_empty"],
    ) == (1, 1, 1)
    assert last["data_wait_s"] >= 0 and 0 <= last["data_wait_pct"] < 100
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [f"data.train_path={tmp_path / 'd.jsonl'}", "data.on_error=fail", "data.shuffle=false"],
    )
    with pytest.raises(DataError, match=r"d.jsonl line 11: malformed JSON .*set data.on_error=skip"):
        _take(DataPipeline(cfg).train_batches(), 20)

    root = tmp_path / "imgs"
    for c in ("0", "1"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            (root / c / f"{i}.png").write_bytes(_png())
    (root / "1" / "broken.png").write_bytes(b"not a png")
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [f"data.train_path={root}", "data.shuffle=false", "train.micro_batch_size=13"],
    )
    batch = next(DataPipeline(cfg).train_batches())
    assert batch["images"].shape[0] == 13 and batch["data_errors"].tolist() == [0, 0, 0, 1]
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [f"data.train_path={root}", "data.on_error=fail", "train.micro_batch_size=13"],
    )
    with pytest.raises(DataError, match=r"broken.png: cannot decode the image"):
        next(DataPipeline(cfg).train_batches())


def test_checkpoint_holds_each_ranks_data_position(in_workdir, tmp_path):
    over = [
        "train.steps=5",
        "train.eval_every=0",
        "checkpoint.every_steps=5",
        "data.shuffle_block=8",
        "train.micro_batch_size=4",
    ]
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, f"run.dir={tmp_path / 'run'}"])
    run(cfg)
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step00000005" / "rank-00000.pt", weights_only=True
    )["data"]
    uninterrupted = DataPipeline(cfg).train_batches()
    _take(uninterrupted, 5)  # the five steps the run took (grad_accum 1)
    resumed = DataPipeline(cfg)
    resumed.load_state_dict(state)
    assert _same(_take(uninterrupted, 4), _take(resumed.train_batches(), 4))


def test_vision_transforms_follow_the_config(in_workdir):
    base = ["data.augment=false", "train.micro_batch_size=4", "data.shuffle=false"]
    a = next(DataPipeline(load_config(CONFIGS / "resnet-cpu-tiny.yaml", base)).train_batches())["images"]
    b = next(
        DataPipeline(
            load_config(CONFIGS / "resnet-cpu-tiny.yaml", [*base, "data.mean=[0,0,0]", "data.std=[1,1,1]"])
        ).train_batches()
    )["images"]
    assert (
        float(b.min()) >= 0.0 and float(b.max()) <= 1.0 and float(a.min()) < 0.0
    )  # plain [0, 1] vs ImageNet-normalised
    wide_pipe = DataPipeline(
        load_config(
            CONFIGS / "resnet-cpu-tiny.yaml",
            [*base, "model.image_size=48", "data.eval_resize_ratio=1.25"],
        )
    )
    c = next(wide_pipe.train_batches())
    assert c["images"].shape == (4, 3, 48, 48)
    # eval: the shorter side resized to 48 x 1.25 = 60, then the central 48 x 48; with ratio 1.0 the
    # whole image is resized to 48: the same images (labels), other pixels
    wide = wide_pipe.eval_batches()
    full = DataPipeline(
        load_config(
            CONFIGS / "resnet-cpu-tiny.yaml", [*base, "model.image_size=48", "data.eval_resize_ratio=1.0"]
        )
    ).eval_batches()
    assert wide and len(wide) == len(full)
    assert all(b["images"].shape == (4, 3, 48, 48) for b in wide + full)
    assert all(torch.equal(w["labels"], f["labels"]) for w, f in zip(wide, full, strict=True))
    assert not any(torch.equal(w["images"], f["images"]) for w, f in zip(wide, full, strict=True))
    from torchvision.transforms import v2

    from distrain.data.vision import IMAGENET_MEAN, IMAGENET_STD

    first = sorted((in_workdir / "data" / "digits" / "val" / "0").iterdir())[0]  # eval is unshuffled
    crop = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(60, antialias=True),
            v2.CenterCrop(48),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    with Image.open(first) as im:
        want = crop(im.convert("RGB"))
    assert wide[0]["labels"][0] == 0
    torch.testing.assert_close(wide[0]["images"][0], want)


def test_another_world_size_continues_from_the_saved_epoch(tmp_path):
    files = []
    for f in range(2):
        p = tmp_path / f"e{f}.jsonl"
        p.write_text("".join(json.dumps({"text": f"<{f}-{i}>" + "y" * 60}) + "\n" for i in range(10)))
        files.append(str(p))
    over = [
        f"data.train_path={tmp_path}/e*.jsonl",
        "data.seq_len=32",
        "train.micro_batch_size=4",
        "data.shuffle_block=4",
    ]
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", over)
    states = []
    for rank in range(2):  # a world of 2 went through a few epochs of this small corpus
        pipe = DataPipeline(cfg, rank=rank, world=2)
        _take(pipe.train_batches(), 30)
        states.append(pipe.state_dict())
    fresh = DataPipeline(cfg, rank=0, world=1)
    epoch = fresh.continue_epoch_of(states)
    assert epoch >= 2
    first = bytes(int(i) for i in next(fresh.train_batches())["input_ids"][0] if i < 256).decode()
    expected = RowCursor(
        sorted(files), "jsonl", 0, 1, seed=0, shuffle=True, block=4, start_epoch=epoch
    ).next_row()
    assert first.startswith(expected.value["text"][:20])  # the first document of that epoch's order
