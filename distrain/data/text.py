"""Text: stream rows with ``datasets``, tokenize, pack into fixed-length sequences.

Each rank reads its own part of the stream through ``datasets.distributed.split_dataset_by_node``
(and ``datasets`` hands each DataLoader worker of that rank its own files); documents are joined with the tokenizer's
end-of-document id and cut into ``seq_len`` windows, so no token is dropped or repeated between
consecutive batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

_BUILDER = {"jsonl": "json", "txt": "text", "parquet": "parquet"}


def stream_rows(files: list[str], fmt: str, shard: int, num_shards: int):
    """A ``datasets`` streaming dataset over ``files`` restricted to shard ``shard`` of ``num_shards``."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    kwargs = {"sample_by": "document"} if fmt == "txt" else {}
    ds = load_dataset(_BUILDER[fmt], data_files=files, split="train", streaming=True, **kwargs)
    if num_shards > 1:
        ds = split_dataset_by_node(ds, rank=shard, world_size=num_shards)
    return ds


class PackedText(IterableDataset):
    """Endless (``loop=True``) or single-pass stream of ``{"input_ids": LongTensor[seq_len]}``."""

    def __init__(self, files, fmt, tokenizer, seq_len, text_field, rank, world, seed, shuffle, loop):
        super().__init__()
        self.files, self.fmt, self.tok = list(files), fmt, tokenizer
        self.seq_len, self.text_field = seq_len, text_field
        self.rank, self.world, self.seed, self.shuffle, self.loop = rank, world, seed, shuffle, loop

    def _documents(self, epoch: int) -> Iterator[str]:
        files = list(self.files)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(files)  # same order on every rank
        # split by rank here; inside a DataLoader worker, datasets itself gives each worker its own files
        rows = stream_rows(files, self.fmt, self.rank, self.world)
        field = "text" if self.fmt == "txt" else self.text_field
        for i, row in enumerate(rows):
            if field not in row:
                raise KeyError(f"data.text_field: row {i} of {files} has no field {field!r} (fields: {sorted(row)}); set data.text_field")
            text = row[field]
            if isinstance(text, str) and text:
                yield text

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buf = np.empty(0, dtype=np.int64)
        epoch = 0
        while True:
            produced = False
            for doc in self._documents(epoch):
                ids = self.tok.encode(doc)
                buf = np.concatenate([buf, ids, np.array([self.tok.eos_id], dtype=np.int64)])
                while len(buf) >= self.seq_len:
                    produced = True
                    yield {"input_ids": torch.from_numpy(buf[: self.seq_len].copy())}
                    buf = buf[self.seq_len :]
            if not self.loop:
                return
            if not produced and epoch > 0:
                raise ValueError(f"data: files {self.files[:3]} hold too little text for one sequence of data.seq_len={self.seq_len} on rank {self.rank}")
            epoch += 1
