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
from distrain.data.tokenizer import ByteTokenizer
from distrain.errors import ConfigError
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
@pytest.mark.parametrize("partitions", [1, 4, 6])
def test_every_row_once_per_epoch_over_partitions(tmp_path, n_files, partitions):
    from distrain.data.plan import PartitionRows, Plan, owned
    from distrain.data.sources import build_manifest

    files, all_rows = _uneven_jsonl(tmp_path, n_files)
    man = build_manifest(f"{tmp_path}/part-*.jsonl", "jsonl", "data.train_path")
    plan = Plan([man], [1.0], seed=3, partitions=partitions, block=5, shuffle=True)
    epochs = []
    for epoch in range(2):
        seen = []
        for p in range(partitions):
            cur = PartitionRows(plan, 0, p, {"epoch": epoch, "block": 0, "idx": 0}, loop=False)
            while got := cur.rows(1 + p):  # rows of any count at a time
                seen.extend((row.file, row.index) for row in got)
        assert len(seen) == len(set(seen)), "a row was read twice"
        assert set(seen) == all_rows
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # each epoch has its own order
    # the ranks of any world size that divides the partitions own disjoint partitions covering all
    for world in (1, 2, 3, 6):
        if partitions % world == 0:
            mine = [owned(partitions, r, world) for r in range(world)]
            assert sorted(p for m in mine for p in m) == list(range(partitions))


def test_large_rows_get_smaller_blocks_and_any_read_size_gives_every_row_once(tmp_path):
    """A block holds at most data.shuffle_block_mb of a source's rows (here 2 KB rows, 10 KiB blocks:
    5 rows); reading a few rows or a whole block at a time gives the same order, each row once, and
    the state before any row resumes exactly there."""
    from distrain.data.plan import PartitionRows, Plan
    from distrain.data.sources import build_manifest

    for f in range(3):
        (tmp_path / f"big-{f}.jsonl").write_text(
            "".join(json.dumps({"text": f"{f}:{i} " + "x" * 2000}) + "\n" for i in range(40))
        )
    man = build_manifest(f"{tmp_path}/big-*.jsonl", "jsonl", "data.train_path")
    plan = Plan([man], [1.0], seed=1, partitions=2, block=64, shuffle=True, block_mb=10 / 1024)
    assert plan.blocks == [5] and Plan([man], [1.0], 1, 2, 64, True).blocks == [64]
    orders, states = [], {}
    for take in (1, 3, 100):
        got = []
        for p in range(2):
            cur = PartitionRows(plan, 0, p, loop=False)
            while rows := cur.rows(take):
                assert len({r.file for r in rows}) >= 1 and len(rows) <= 5
                e, blocks, idxs = cur.before(len(rows))
                befores = [{"epoch": e, "block": b, "idx": i} for b, i in zip(blocks, idxs, strict=True)]
                for row, st in zip(rows, befores, strict=True):
                    states.setdefault((row.file, row.index), (p, st))
                    got.append((row.file, row.index))
        orders.append(got)
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == sorted(
        (str(tmp_path / f"big-{f}.jsonl"), i) for f in range(3) for i in range(40)
    )
    assert orders[0][:40] != sorted(orders[0][:40])  # shuffled
    for k in (0, 7, 33, 59):  # resume from the state before row k of partition 0
        p, st = states[orders[0][k]]
        cur = PartitionRows(plan, 0, p, st, loop=False)
        rest = []
        while rows := cur.rows(4):
            rest += [(r.file, r.index) for r in rows]
        n0 = sum(1 for x in orders[0] if states[x][0] == 0)
        assert rest == orders[0][k:n0]


@pytest.mark.parametrize("columns", [["text"], ["text", "n"], ["text", "n", "tags"]])
def test_parquet_rows_are_the_files_rows_as_to_pylist_gives_them(tmp_path, columns):
    """A shuffled parquet block is handed out as dicts a column at a time: each row's value is what
    pyarrow's ``to_pylist()`` gives for that row of its file (nulls, lists, any number of columns),
    read in any slice size, across row groups and files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distrain.data.plan import PartitionRows, Plan
    from distrain.data.sources import build_manifest

    expect = {}
    for f in range(2):
        n = 70 + 13 * f
        table = pa.table(
            {
                "text": [None if i % 11 == 3 else f"{f}:{i}" for i in range(n)],
                "n": [i * (f + 1) for i in range(n)],
                "tags": [[i, None, f] if i % 4 else None for i in range(n)],
            }
        ).select(columns)
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(table, path, row_group_size=16)
        expect |= {(str(path), i): r for i, r in enumerate(pq.read_table(path).to_pylist())}
    man = build_manifest(f"{tmp_path}/*.parquet", "parquet", "data.train_path")
    plan = Plan([man], [1.0], seed=5, partitions=2, block=24, shuffle=True)
    for take in (1, 5, 32):
        got = {}
        for p in range(2):
            cur = PartitionRows(plan, 0, p, loop=False)
            while rows := cur.rows(take):
                got |= {(r.file, r.index): r.value for r in rows}
        assert got == expect


def test_block_size_follows_the_rows_size_in_memory_not_on_disk(tmp_path):
    """Parquet images that compress well (here one 5 KB blob, dictionary-encoded) are small on disk
    and 5 KB each in memory: the cap counts the decoded size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distrain.data.plan import Plan
    from distrain.data.sources import build_manifest

    blob = bytes(range(256)) * 20
    pq.write_table(pa.table({"image": [blob] * 400, "label": [1] * 400}), tmp_path / "img.parquet")
    man = build_manifest(str(tmp_path / "img.parquet"), "parquet", "data.train_path")
    assert man.files[0].size < 400 * len(blob) / 10
    plan = Plan([man], [1.0], 0, 4, 1024, True, block_mb=0.1)
    assert 18 <= plan.blocks[0] <= 20 and plan.reads[0] == plan.blocks[0]


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
    # another number of workers continues the same stream (the position is the plan's, not the loader's)
    other = DataPipeline(load_config(CONFIGS / name, [*over[1:], f"data.num_workers={2 - workers}"]))
    other.load_state_dict(state)
    assert _same(expected, _take(other.train_batches(), m))


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
            "train.steps=16",
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


def test_augmentation_is_torchvisions_crop_seeded_per_row_and_leaves_torchs_generator_alone(in_workdir):
    """A training image is torchvision's resized crop (and flip) of the row's image, with a box drawn
    from the row's own seed: the same row gives the same image in any process, other rows others,
    and decoding draws nothing from torch's generator (the training thread's dropout stream)."""
    import random

    from torchvision.transforms import v2

    from distrain.data.plan import Doc
    from distrain.data.vision import DecodeImages, crop_box

    cfg = load_config(CONFIGS / "resnet-cpu-tiny.yaml", ["data.hflip=true", "model.image_size=24"])
    decode = DecodeImages(cfg, True, "imagefolder")
    path = sorted((in_workdir / "data" / "digits" / "train" / "3").iterdir())[0]

    def doc(epoch: int, index: int) -> Doc:
        return Doc(0, 0, epoch, 0, 0, (), str(path), index, {"path": str(path), "label": 3}, None, 7)

    before = torch.random.get_rng_state()
    image, label = decode(doc(0, 5)).units[0]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == 3
    # the same row again gives the same pixels; other epochs and rows other crops
    assert torch.equal(decode(doc(0, 5)).units[0][0], image)
    others = [decode(doc(e, i)).units[0][0] for e, i in ((1, 5), (0, 6), (2, 9))]
    assert not any(torch.equal(o, image) for o in others)
    # what torchvision's own resized crop and flip give on the PIL image for the drawn box
    rng = random.Random(hash((cfg.run.seed, 0, 7, 5)))
    with Image.open(path) as im:
        pil = im.convert("RGB")
    left, top, w, h = crop_box(pil.width, pil.height, tuple(cfg.data.crop_scale), rng)
    want = v2.functional.resized_crop(pil, top, left, h, w, [24, 24], antialias=True)
    if rng.random() < 0.5:
        want = v2.functional.horizontal_flip(want)
    assert torch.equal(image, v2.functional.pil_to_tensor(want))
    # the boxes follow torchvision's sampling: an area fraction in data.crop_scale, aspect in [3/4, 4/3]
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = crop_box(320, 240, (0.25, 0.5), rng)
        assert 0 <= left <= 320 - w and 0 <= top <= 240 - h
        assert 0.24 <= w * h / (320 * 240) <= 0.51 and 0.7 <= w / h <= 1.4


def _small_corpus(tmp_path, model: str) -> str:
    """A corpus that a few hundred samples go through several times (epoch ends on the way)."""
    rng = np.random.default_rng(1)
    if model == "gpt":
        for f in range(3):
            (tmp_path / f"c{f}.jsonl").write_text(
                "".join(
                    json.dumps({"text": f"<{f}-{i}>" + "z" * int(rng.integers(5, 120))}) + "\n"
                    for i in range(12)
                )
            )
        return f"{tmp_path}/c*.jsonl"
    root = tmp_path / "imgs"
    for c in range(4):
        (root / str(c)).mkdir(parents=True)
        for i in range(12):
            px = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(px, mode="L").save(root / str(c) / f"{i:02d}.png")
    return str(root)


def _save_ranks(root, states: list) -> tuple:
    """The per-rank files of a checkpoint, as the checkpointer writes them."""
    root.mkdir()
    for r, st in enumerate(states):
        torch.save({"data": st}, root / f"rank-{r:05d}.pt")
    return root, len(states)


def _rows(batches, key):
    return [x for b in batches for x in b[key]]


@pytest.mark.parametrize("model", ["gpt", "resnet"])
def test_any_sequence_of_world_sizes_continues_one_global_stream(in_workdir, tmp_path, model):
    """1 -> 2 -> 3 -> 1 ranks, with 0, 2, 1 and 2 DataLoader workers, global batch 12 throughout:
    the samples the job trains on, in global order, are those of one uninterrupted rank, with
    shuffling and augmentation on: nothing dropped, repeated or reordered, across epoch ends."""
    from distrain.checkpoint import SavedRanks

    name, key = {"gpt": ("gpt-cpu-tiny.yaml", "input_ids"), "resnet": ("resnet-cpu-tiny.yaml", "images")}[
        model
    ]
    over = [
        f"data.train_path={_small_corpus(tmp_path, model)}",
        "data.partitions=12",
        "data.shuffle=true",
        "data.shuffle_block=4",
        "data.seq_len=32",
        "train.micro_batch_size=2",
        "run.seed=7",
        "data.augment=true",
        "data.eval_path=null",
    ]
    per_segment, layouts = 60, [(1, 0), (2, 2), (3, 1), (1, 2)]
    ref = DataPipeline(load_config(CONFIGS / name, over))
    reference = _rows(_take(ref.train_batches(), per_segment * len(layouts) // 2), key)
    ref.close()
    got, saved = [], None
    for i, (world, workers) in enumerate(layouts):
        cfg = load_config(CONFIGS / name, [*over, f"data.num_workers={workers}"])
        pipes = [DataPipeline(cfg, r, world) for r in range(world)]
        for r, pipe in enumerate(pipes):
            if saved:
                ckpt, saved_world = saved
                own = (
                    torch.load(ckpt / f"rank-{r:05d}.pt", weights_only=True) if saved_world == world else None
                )
                pipe.load_state_dict(SavedRanks(ckpt, "data", saved_world, r, world, own))
        segment = [None] * per_segment
        for r, pipe in enumerate(pipes):  # rank r's local sample n is sample r + world * n of the segment
            for n, x in enumerate(_rows(_take(pipe.train_batches(), per_segment // world // 2), key)):
                segment[r + world * n] = x
        states = [p.state_dict() for p in pipes]
        assert {s["cursor"] for s in states} == {per_segment * (i + 1)}
        for p in pipes:
            p.close()
        got += segment
        saved = _save_ranks(tmp_path / f"ckpt{i}", states)
    assert len(got) == len(reference)
    for j, (a, b) in enumerate(zip(got, reference, strict=True)):
        assert torch.equal(a, b), f"sample {j} of the global stream differs"
    if model == "gpt":  # the stream went round the corpus: every document appears in the windows
        text = ByteTokenizer().decode(torch.cat(reference).tolist())
        assert all(f"<{f}-{i}>" in text for f in range(3) for i in range(12))
        assert len(reference) * 32 > 2 * sum(
            len(json.loads(ln)["text"]) + 1
            for f in range(3)
            for ln in (tmp_path / f"c{f}.jsonl").read_text().splitlines()
        )


def test_resume_refuses_a_world_size_the_cursor_does_not_divide_and_a_changed_plan(in_workdir, tmp_path):
    from distrain.checkpoint import SavedRanks

    over = ["data.partitions=12", "train.micro_batch_size=2"]
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", over)
    pipes = [DataPipeline(cfg, r, 2) for r in range(2)]
    for p in pipes:
        _take(p.train_batches(), 1)  # 2 ranks x 2 samples: the cursor is at 4
    ckpt, _ = _save_ranks(tmp_path / "ck", [p.state_dict() for p in pipes])
    for p in pipes:
        p.close()
    three = DataPipeline(cfg, 0, 3)
    with pytest.raises(DataError, match=r"cursor is at sample 4 .* does not divide over 3 ranks"):
        three.load_state_dict(SavedRanks(ckpt, "data", 2, 0, 3, None))
    own = torch.load(ckpt / "rank-00000.pt", weights_only=True)
    for key, value in (
        ("data.partitions", 6),
        ("data.shuffle_block", 8),
        ("data.shuffle_block_mb", 0.5),
        ("run.seed", 3),
    ):
        other = DataPipeline(load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, f"{key}={value}"]), 0, 2)
        with pytest.raises(DataError, match=rf"saved with {key}=.*resume with {key}="):
            other.load_state_dict(SavedRanks(ckpt, "data", 2, 0, 2, own))
    # a position saved before blocks were capped by bytes resumes only with the cap off
    own = own["data"]
    del own["plan"]["block_mb"], own["plan"]["blocks"]  # as an earlier version saved it
    with pytest.raises(
        DataError,
        match=r"saved with data.shuffle_block_mb=null, this run has 1.0 \(resume with data.shuffle_block_mb=null\)",
    ):
        DataPipeline(cfg, 0, 2).load_state_dict(own)
    uncapped = DataPipeline(
        load_config(CONFIGS / "gpt-cpu-tiny.yaml", [*over, "data.shuffle_block_mb=null"]), 0, 2
    )
    uncapped.load_state_dict(own)
    with pytest.raises(ConfigError, match=r"data.partitions=12 is not divisible by the world size 5"):
        DataPipeline(cfg, 0, 5)
