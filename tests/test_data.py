"""Data read for training: text packing loses and repeats nothing, every format reads, errors name
the key and the file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.config import load_config
from distrain.data import DataError, DataPipeline
from distrain.data.tokenizer import ByteTokenizer
from distrain.errors import ConfigError
from distrain.train import run
from tests.conftest import CONFIGS, read_jsonl


def _docs(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"<doc {i}>" + "x" * int(rng.integers(0, 300)) + f"</doc {i}>" for i in range(n)]


def _write_jsonl(tmp_path, docs, shards=3):
    files = []
    for s in range(shards):
        p = tmp_path / f"part-{s}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[s::shards]))
        files.append(str(p))
    return files


def _plan(files, fmt="jsonl", partitions=1, shuffle=False, block=7, seed=0):
    from distrain.data.plan import Plan
    from distrain.data.sources import build_manifest

    man = build_manifest(
        files
        if isinstance(files, str)
        else files[0]
        if len(files) == 1
        else f"{Path(files[0]).parent}/*.{fmt}",
        fmt,
        "data.train_path",
    )
    return Plan([man], [1.0], seed, partitions, block, shuffle)


def test_packing_reassembles_the_exact_token_stream(tmp_path):
    from distrain.data.plan import Partition, TokenPacker
    from distrain.data.text import TokenizeRows

    docs = _docs(40)
    files = _write_jsonl(tmp_path, docs, shards=1)
    tok = ByteTokenizer()
    part = Partition(
        _plan(files), 0, None, TokenPacker(64), TokenizeRows(tok, ["jsonl"], "text"), "skip", loop=False
    )
    windows = []
    while (got := part.step()) is not None:
        windows += [s.data for s in got]
    got = np.concatenate(windows)
    want = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    assert all(len(w) == 64 for w in windows)
    assert len(got) == len(want) // 64 * 64  # only the final partial window is left over
    assert np.array_equal(got, want[: len(got)])


def _assert_batches_hold(pipe, docs_ids: list[list[int]], eos: int, n: int = 4) -> list[int]:
    """The first ``n`` train batches of ``pipe`` (their ids returned) are those documents, tokenized as ``docs_ids``.
    Batches are consecutive windows of one stream (data.partitions=1): joined, they split at
    ``eos`` into whole documents, after the tail of one and before the head of another."""
    it = pipe.train_batches()
    ids = [i for _ in range(n) for i in next(it)["input_ids"].reshape(-1).tolist()]
    assert max(ids) < pipe.tokenizer.vocab_size
    pieces, cur = [], []
    for i in ids:
        if i == eos:
            pieces.append(cur)
            cur = []
        else:
            cur.append(i)
    head, *inner, tail = [*pieces, cur]
    # the longest document is shorter than a third of the tokens read: at least two whole ones
    assert len(inner) >= 2, f"{len(pieces)} documents ended in {len(ids)} tokens"
    whole = {tuple(d) for d in docs_ids}
    assert all(tuple(p) in whole for p in inner), "a document in the batches is none of those written"
    assert any(d[len(d) - len(head) :] == head for d in docs_ids)  # the end of one of them
    assert any(d[: len(tail)] == tail for d in docs_ids)  # the start of one of them
    return ids


def test_txt_and_parquet_text_and_hf_tokenizer(in_workdir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = _docs(30)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    # a byte-level BPE tokenizer trained here (the 256 byte symbols, 2 special tokens, then merges:
    # ids past the byte tokenizer's 0-256) and saved as a local HF directory
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "tok"
    )

    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    byte_ids = [ByteTokenizer().encode(d).tolist() for d in docs]
    hf_ids = [hf(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert len(hf) == 300 and max(i for ids in hf_ids for i in ids) >= 257  # merges past the byte ids

    for fmt_overrides, want, eos in (
        ([f"data.train_path={tmp_path / 'txt'}/*.txt"], byte_ids, ByteTokenizer.eos_id),
        (
            [f"data.train_path={tmp_path / 'docs.parquet'}", "data.text_field=body"],
            byte_ids,
            ByteTokenizer.eos_id,
        ),
        (
            [
                f"data.train_path={tmp_path / 'docs.parquet'}",
                "data.text_field=body",
                f"data.tokenizer={tmp_path / 'tok'}",
                "model.vocab_size=320",
            ],
            hf_ids,
            hf.eos_token_id,
        ),
    ):
        cfg = load_config(
            CONFIGS / "gpt-cpu-tiny.yaml",
            [
                f"run.dir={tmp_path / 'run'}",
                "train.steps=3",
                "data.eval_path=null",
                "data.seq_len=32",
                "data.partitions=1",  # one partition: the batches are consecutive windows of one stream
                "checkpoint.at_end=false",
                *fmt_overrides,
            ],
        )
        pipe = DataPipeline(cfg)
        ids = _assert_batches_hold(pipe, want, eos)
        if want is hf_ids:  # the pipeline reads with the HF tokenizer saved here, not bytes
            assert pipe.tokenizer.vocab_size == len(hf) and pipe.tokenizer.eos_id == hf.eos_token_id
            assert max(ids) >= 257
        else:
            assert pipe.tokenizer.vocab_size == 257 and max(ids) <= 256
        assert run(cfg)["status"] == "completed"

    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml", [f"data.tokenizer={tmp_path / 'tok'}", "model.vocab_size=100"]
    )
    with pytest.raises(
        ConfigError,
        match=r"model.vocab_size \(100\) is smaller than the vocabulary .* set model.vocab_size >= \d+",
    ):
        DataPipeline(cfg)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_images_train_and_label_checks(in_workdir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 64)
    pq.write_table(
        pa.table(
            {"image": [{"bytes": _png(int(60 * lab + 10)), "path": None} for lab in labels], "label": labels}
        ),
        tmp_path / "img.parquet",
    )
    pq.write_table(pa.table({"png": [_png(1)] * 8, "label": [0] * 8}), tmp_path / "raw.parquet")
    base = [
        f"run.dir={tmp_path / 'run'}",
        "train.steps=3",
        "train.micro_batch_size=8",
        "data.eval_path=null",
        "checkpoint.at_end=false",
    ]
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml", [*base, f"data.train_path={tmp_path / 'img.parquet'}"]
    )
    assert run(cfg)["status"] == "completed"
    # the batches are those rows: each image is the flat grey 60 x label + 10 of its own row (any
    # crop of it is that grey), ImageNet-normalised, at the model's size
    from distrain.data.vision import IMAGENET_MEAN, IMAGENET_STD

    batch = next(DataPipeline(cfg).train_batches())
    assert batch["images"].shape == (8, 3, 32, 32) and set(batch["labels"].tolist()) <= {0, 1, 2}
    assert (
        len(set(batch["labels"].tolist())) > 1
    )  # several greys: each image is checked against its own label
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image, label in zip(batch["images"], batch["labels"].tolist(), strict=True):
        grey = ((60 * label + 10) / 255 - mean) / std
        torch.testing.assert_close(image, grey.expand_as(image))
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [*base, f"data.train_path={tmp_path / 'raw.parquet'}", "data.image_field=png"],
    )
    batch = next(DataPipeline(cfg).train_batches())
    assert batch["images"].shape == (8, 3, 32, 32) and batch["labels"].tolist() == [0] * 8
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml",
        [*base, f"data.train_path={tmp_path / 'img.parquet'}", "data.label_field=y"],
    )
    with pytest.raises(DataError, match=r"data.label_field: .*img.parquet has no column 'y'"):
        next(DataPipeline(cfg).train_batches())
    cfg = load_config(CONFIGS / "resnet-cpu-tiny.yaml", [*base, "model.num_classes=5"])
    with pytest.raises(DataError, match=r"has 10 classes but model.num_classes=5"):
        next(DataPipeline(cfg).train_batches())


def test_imagefolder_batches_and_eval_transform(in_workdir):
    cfg = load_config(CONFIGS / "resnet-cpu-tiny.yaml", ["train.micro_batch_size=4"])
    pipe = DataPipeline(cfg)
    b = next(pipe.train_batches())
    assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.float32
    ev1, ev2 = pipe.eval_batches(), pipe.eval_batches()
    assert len(ev1) == cfg.train.eval_batches and all(
        torch.equal(a["images"], c["images"]) for a, c in zip(ev1, ev2, strict=False)
    )


def test_missing_data_and_bad_field_errors(in_workdir, tmp_path):
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", ["data.train_path=data/nothing/*.jsonl"])
    with pytest.raises(
        DataError,
        match=r"data.train_path: no data files at 'data/nothing/\*.jsonl'.*distrain data prepare",
    ):
        DataPipeline(cfg)
    files = _write_jsonl(tmp_path, _docs(5), shards=1)
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [f"data.train_path={files[0]}", "data.text_field=content", "data.on_error=fail"],
    )
    with pytest.raises(DataError, match=r"part-0.jsonl line \d+: no field 'content' .*set data.text_field"):
        next(DataPipeline(cfg).train_batches())
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml", [f"data.train_path={files[0]}", "data.text_field=content"]
    )
    with pytest.raises(
        DataError, match=r"no usable row in a whole epoch of .*part-0.jsonl.*check data.text_field"
    ):
        next(DataPipeline(cfg).train_batches())


def test_prepared_data_is_what_the_tiny_configs_read(in_workdir):
    recs = read_jsonl(in_workdir / "data" / "pydoc" / "val.jsonl")
    assert len(recs) >= 5 and all(r["text"] for r in recs)
    digits = sorted(p.name for p in (in_workdir / "data" / "digits" / "train").iterdir())
    assert digits == [str(i) for i in range(10)]
    n_train = sum(1 for _ in (in_workdir / "data" / "digits" / "train").rglob("*.png"))
    n_val = sum(1 for _ in (in_workdir / "data" / "digits" / "val").rglob("*.png"))
    assert n_train + n_val == 1797 and n_val == 1797 // 5
