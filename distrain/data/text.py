"""Text: rows from one or more sources, tokenized and packed into fixed-length sequences, with a
position that can be saved and restored exactly.

Order, written down once. Epoch ``e`` of a source visits its files in an order shuffled by
``(run.seed, e)`` (the same on every rank). Shard ``s`` of ``n`` (n = world size x DataLoader
workers) takes every n-th file when the file count divides by n, else every n-th row. Its rows are
taken in blocks of ``data.shuffle_block`` and each block is permuted by ``(seed, e, s, block)``.
Sources are mixed per document by weight with a choice seeded by ``(seed, s, document number)``.
Documents are joined with the end-of-document id and cut into ``seq_len`` windows.

Every window ends inside (or at the end of) the document being read, so the position after a window
is fully described by the mixer's state before that document and a token offset into it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distrain.data.sources import DataError, Row, read_rows

log = logging.getLogger(__name__)

ERROR_KINDS = ("malformed", "missing_field", "empty", "undecodable")


def _permutation(n: int, *key: Any) -> list[int]:
    order = list(range(n))
    random.Random(":".join(map(str, key))).shuffle(order)
    return order


class RowCursor:
    """One source's rows for one shard, over endless epochs, block-shuffled; saves its position."""

    def __init__(
        self,
        files: list[str],
        fmt: str,
        shard: int,
        num_shards: int,
        seed: int,
        shuffle: bool,
        block: int,
        source_id: int = 0,
        loop: bool = True,
        start_epoch: int = 0,
    ):
        self.files, self.fmt = list(files), fmt
        self.shard, self.num_shards, self.seed, self.shuffle = shard, num_shards, seed, shuffle
        self.block_size = block if shuffle else 1
        self.source_id, self.loop = source_id, loop
        self.by_file = len(self.files) % num_shards == 0
        self.state = {"epoch": start_epoch, "file": 0, "row": 0, "counter": 0, "block": 0, "idx": 0}
        self._block: list[Row] | None = None
        self._block_end: dict[str, int] | None = None

    # position -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = {k: int(state[k]) for k in ("epoch", "file", "row", "counter", "block", "idx")}
        self._block = None

    # reading --------------------------------------------------------------------------------
    def _epoch_files(self, epoch: int) -> list[str]:
        files = self.files
        if self.shuffle:
            files = [files[i] for i in _permutation(len(files), self.seed, self.source_id, epoch)]
        return files[self.shard :: self.num_shards] if self.by_file else files

    def _read_block(self) -> bool:
        """Read the next block from the sequential position in ``self.state`` and permute it;
        False when a single-pass cursor reaches the end of its epoch."""
        st = self.state
        files = self._epoch_files(st["epoch"])
        rows: list[Row] = []
        f, r, counter = st["file"], st["row"], st["counter"]
        while len(rows) < self.block_size and f < len(files):
            for row in read_rows(files[f], self.fmt, start=r):
                r = row.index + 1
                keep = self.by_file or counter % self.num_shards == self.shard
                counter += 1
                if keep:
                    rows.append(row)
                    if len(rows) == self.block_size:
                        break
            else:
                f, r = f + 1, 0
                continue
            break
        if not rows:
            if st["file"] == 0 and st["row"] == 0:
                raise DataError(
                    f"data: shard {self.shard} of {self.num_shards} has no rows in {self.files[:3]}; use fewer workers or more data"
                )
            if not self.loop:
                return False
            # the epoch is over: next epoch from its first file
            self.state = {"epoch": st["epoch"] + 1, "file": 0, "row": 0, "counter": 0, "block": 0, "idx": 0}
            return self._read_block()
        if self.shuffle:
            rows = [
                rows[i]
                for i in _permutation(
                    len(rows), self.seed, self.source_id, st["epoch"], self.shard, st["block"]
                )
            ]
        self._block = rows
        self._block_end = {"file": f, "row": r, "counter": counter}
        return True

    def next_row(self) -> Row | None:
        if self._block is None and not self._read_block():
            return None
        st = self.state
        row = self._block[st["idx"]]
        st["idx"] += 1
        if st["idx"] == len(self._block):  # the block is done: the next one starts where it ended
            st.update(self._block_end, block=st["block"] + 1, idx=0)
            self._block = None
        return row


class PackedText(IterableDataset):
    """Endless (``loop=True``) or single-pass stream of batches ``{"input_ids": LongTensor[batch_size,
    seq_len], "data_errors": LongTensor[len(ERROR_KINDS)]}`` for one rank, with ``state_dict()``.
    Batches are built here (the DataLoader takes ``batch_size=None``): one hand-over per batch."""

    def __init__(
        self,
        sources: list[tuple[list[str], str, float]],
        tokenizer,
        seq_len: int,
        text_field: str,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool,
        loop: bool,
        block: int = 1024,
        on_error: str = "skip",
        batch_size: int = 1,
        start_epoch: int = 0,
    ):
        super().__init__()
        self.sources = sources  # (files, format, weight)
        self.tok, self.seq_len, self.text_field = tokenizer, seq_len, text_field
        self.rank, self.world, self.seed, self.shuffle, self.loop = rank, world, seed, shuffle, loop
        self.block, self.on_error, self.batch_size = block, on_error, batch_size
        self.start_epoch = start_epoch  # where a fresh stream starts (a resume after a world-size change)
        total = sum(w for _, _, w in sources)
        self.cum = np.cumsum([w / total for _, _, w in sources])
        self._resume: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None

    # position -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._state if self._state is not None else (self._resume or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state or None
        self._state = None

    # stream ---------------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * nw + wid, self.world * nw

    def _text(self, row: Row, fmt: str, errors: np.ndarray) -> str | None:
        """The row's text, or None for a bad row (counted, or raised with data.on_error=fail)."""
        field = "text" if fmt == "txt" else self.text_field
        if row.error is not None:
            kind, msg = "malformed", row.error
        elif field not in row.value:
            kind, msg = (
                "missing_field",
                f"no field {field!r} (fields: {sorted(row.value)}); set data.text_field",
            )
        elif not isinstance(row.value[field], str) or not row.value[field]:
            kind, msg = "empty", f"field {field!r} is empty or not a string"
        else:
            return row.value[field]
        if self.on_error == "fail":
            raise DataError(f"{row.where}: {msg}; fix the row or set data.on_error=skip")
        errors[ERROR_KINDS.index(kind)] += 1
        n = int(errors.sum())
        if n <= 3 or n % 1000 == 0:
            log.warning("skipping %s: %s (data.on_error=skip)", row.where, msg)
        return None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows, errors = [], None
        shard, num_shards = self._shard()
        key = f"shard{shard}/{num_shards}"
        for seq, before, offset, errs in self._sequences(shard, num_shards):
            rows.append(seq)
            errors = errs if errors is None else errors + errs
            if len(rows) == self.batch_size:
                self._state = {key: {**before, "offset": offset}}
                yield {"input_ids": torch.from_numpy(np.stack(rows)), "data_errors": torch.from_numpy(errors)}
                rows, errors = [], None

    def _sequences(
        self, shard: int, num_shards: int
    ) -> Iterator[tuple[np.ndarray, dict[str, Any], int, np.ndarray]]:
        """(window, mixer state before its last document, token offset into that document after
        the window, bad rows counted since the previous window).

        One generator on purpose: the packing buffer, the sources' cursors and the mixing draw
        change together per document, and the resumable state is read between two yields."""
        cursors = [
            RowCursor(
                files,
                fmt,
                shard,
                num_shards,
                self.seed,
                self.shuffle,
                self.block,
                source_id=i,
                loop=self.loop,
                start_epoch=self.start_epoch,
            )
            for i, (files, fmt, _) in enumerate(self.sources)
        ]
        n_docs, offset = 0, 0
        resume = self._resume
        if resume:
            key = f"shard{shard}/{num_shards}"
            if key not in resume:
                raise DataError(
                    f"data: the saved data position is for shards {sorted(resume)}, not {key}; resume with the same world size and data.num_workers"
                )
            resume = resume[key]
            for c, st in zip(cursors, resume["sources"], strict=True):
                c.load_state_dict(st)
            n_docs, offset = int(resume["docs"]), int(resume["offset"])
        errors = np.zeros(len(ERROR_KINDS), dtype=np.int64)
        last_good = [c.state["epoch"] - 1 for c in cursors]
        buf: list[np.ndarray] = []
        have = 0
        while True:
            before = {"docs": n_docs, "sources": [c.state_dict() for c in cursors]}
            u = random.Random(f"{self.seed}:{shard}:{n_docs}").random()
            src = int(np.searchsorted(self.cum, u, side="right")) if len(cursors) > 1 else 0
            src = min(src, len(cursors) - 1)
            epoch = cursors[src].state["epoch"]
            row = cursors[src].next_row()
            if row is None:  # single pass (eval) over
                return
            n_docs += 1
            text = self._text(row, self.sources[src][1], errors)
            if text is None:
                offset = 0
                if epoch - last_good[src] >= 2:  # a whole epoch of this source without one usable row
                    raise DataError(
                        f"data: no usable row in a whole epoch of {self.sources[src][0][:3]} (last: {row.where}); check data.text_field and data.format"
                    )
                continue
            last_good[src] = epoch
            toks = np.append(self.tok.encode(text), self.tok.eos_id)
            off, offset = offset, 0  # a restored offset applies to the first document only
            while have + len(toks) - off >= self.seq_len:
                need = self.seq_len - have
                buf.append(toks[off : off + need])
                off += need
                seq = np.concatenate(buf)
                buf, have = [], 0
                yield seq, before, off, errors.copy()
                errors[:] = 0
            if off < len(toks):
                buf.append(toks[off:])
                have += len(toks) - off
