"""The data plan: one order for every engine, world size and number of workers, and one cursor.

Written down once:

- **Epoch order.** Each source's files are visited in an order shuffled by ``(run.seed, source,
  epoch)``; their rows, end to end, form the epoch's row space of ``N`` rows.
- **Partitions.** The row space is cut into ``K = data.partitions`` canonical partitions on chunk
  boundaries (a chunk: a row of a small file, 1024 lines of a large jsonl file, a row group of a
  large parquet file; ``C`` of them in all): partition ``p`` holds chunks ``[p*C//K, (p+1)*C//K)``
  of the epoch's order, so no chunk is read by two partitions and each starts at a seek point. A
  partition reads its rows front to back in blocks of ``B`` rows, each block permuted by ``(seed,
  source, epoch, p, block)``: ``B = data.shuffle_block``, or fewer for a source whose rows are large,
  so that a block holds about ``data.shuffle_block_mb`` (``B`` is a function of the manifest). When its
  rows are done it goes on with its next epoch. With several text sources a partition draws each
  document from one of them by weight, with a choice seeded by ``(seed, p, document number)``.
- **Samples.** A partition turns its rows into samples: text rows are tokenized, joined with the
  end-of-document id and cut into ``seq_len`` windows; an image row is one sample.
- **The global stream.** Sample ``j`` of the job is the next sample of partition ``j mod K``.
  Rank ``r`` of ``w`` takes the samples ``j = r, r+w, r+2w, ...``: the partitions ``p = r (mod w)``,
  which only it reads, in turn. ``K`` must be divisible by ``w``.
- **The cursor.** After ``T`` samples of the global stream partition ``p`` has given ``T//K + (p <
  T mod K)`` samples, whatever the world size was. A checkpoint saves ``T`` and, for every
  partition, where its next sample starts (its rows' epoch, block and index, the token offset into
  the document, the sample count). A resume on any world size whose size divides ``T`` continues
  exactly: every rank picks up its partitions where they stood.

None of it depends on the world size, ``data.num_workers`` or the engine: they only decide who
reads which partition.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from distrain.data.sources import Manifest, Rows, iter_raw, make_rows, row_bytes, row_where
from distrain.errors import DataError

log = logging.getLogger(__name__)

ERROR_KINDS = ("malformed", "missing_field", "empty", "undecodable")
PARTITION_UNIT = 64
MIN_PARTITION_ROWS = 16
CHUNKS = "a chunk is a row of a small file, 1024 lines of a large jsonl file or a row group of a parquet file"


def default_partitions(manifests: list[Manifest], sizes: list[int], origin: str = "the world size") -> int:
    """``data.partitions`` for a run that may train on any of ``sizes`` ranks: the smallest multiple
    of 64 that every size divides. A source too small for that (every partition needs a chunk, and
    should keep 16 rows so that one bad row cannot empty it) gets the largest ``lcm(sizes) x 2**j``
    that fits; one with fewer chunks than ``lcm(sizes)`` is refused, naming both counts."""
    need = math.lcm(*sizes)
    src = min(manifests, key=lambda m: int(m.chunks.sum()))
    chunks = int(src.chunks.sum())
    room = min(chunks, min(m.total for m in manifests) // MIN_PARTITION_ROWS)
    best = math.lcm(PARTITION_UNIT, need)
    if best <= room:
        return best
    if need > chunks:
        shown = (
            ""
            if len(sizes) == 1
            else ": " + ", ".join(map(str, sizes[:6])) + (", ..." if len(sizes) > 6 else "")
        )
        raise DataError(
            f"data.partitions: every world size the run may use ({origin}{shown}) must divide the data's partitions, "
            f"so it needs a multiple of {need}, but {src.key} has {src.total:,} rows in {chunks:,} chunks ({CHUNKS}) "
            f"and every partition needs one; give it more files or smaller ones (parquet: smaller row groups), "
            f"or train on a number of ranks that divides a count of at most {chunks:,}"
        )
    k = need
    while 2 * k <= room:
        k *= 2
    return k


class Plan:
    """The order of every source: (manifests, seed, partitions, block, shuffle), nothing else."""

    def __init__(
        self,
        manifests: list[Manifest],
        weights: list[float],
        seed: int,
        partitions: int,
        block: int,
        shuffle: bool,
        check_rows: bool = True,
        block_mb: float | None = None,
    ):
        self.manifests, self.seed, self.partitions = manifests, seed, partitions
        self.block, self.shuffle, self.block_mb = block, shuffle, block_mb
        # rows per block of each source: one without shuffling (the order is the files'), else at most
        # ``block`` rows and about ``block_mb`` of the source's bytes (its mean row size)
        sizes = [row_bytes(m) if block_mb else 0.0 for m in manifests]
        self.blocks = [1 if not shuffle else self._block_rows(b, block) for b in sizes]
        # rows read at a time (a parquet batch, a run of jsonl lines; the read-ahead without shuffling)
        self.reads = [self._block_rows(b, 1024) for b in sizes]
        total = sum(weights)
        self.cum_weights = np.cumsum([w / total for w in weights])
        for m in manifests if check_rows else ():
            chunks = int(m.chunks.sum())
            if chunks < partitions:
                raise DataError(
                    f"{m.key}: {m.total} rows in {chunks} chunks (rows of small files, 1024-line blocks of large "
                    f"jsonl files, row groups of large parquet files), fewer than data.partitions={partitions}; "
                    f"set data.partitions <= {chunks} (and divisible by the world size), or write parquet with "
                    "smaller row groups"
                )
        self._orders: dict[tuple[int, int], tuple] = {}
        self._starts: dict[tuple[int, int], np.ndarray] = {}

    def _block_rows(self, size: float, most: int) -> int:
        """At most ``most`` rows, and about ``block_mb`` of rows of ``size`` bytes."""
        if not self.block_mb or size <= 0:
            return most
        return max(1, min(most, int(self.block_mb * 2**20 / size)))

    def key(self) -> dict[str, Any]:
        """What a saved position depends on; a resume must have the same."""
        return {
            "partitions": self.partitions,
            "block": self.block if self.shuffle else 1,
            "block_mb": self.block_mb if self.shuffle else None,
            "blocks": self.blocks,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "digests": [m.digest for m in self.manifests],
        }

    def order(self, src: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file indices in the epoch's order, cumulative rows and cumulative chunks along it)."""
        key = (src, epoch)
        if key not in self._orders:
            m = self.manifests[src]
            n = len(m.files)
            order = (
                np.random.default_rng([self.seed, src, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            if len(self._orders) >= 8:  # epochs in use: at most a couple per source
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = (order, np.cumsum(m.rows[order]), np.cumsum(m.chunks[order]))
        return self._orders[key]

    def _row_of_chunk(self, src: int, epoch: int, c: int) -> int:
        order, rows, chunks = self.order(src, epoch)
        if c >= int(chunks[-1]):
            return int(rows[-1])
        k = int(np.searchsorted(chunks, c, side="right"))
        j = c - (int(chunks[k - 1]) if k else 0)
        f = int(order[k])
        if (src, f) not in self._starts:
            self._starts[(src, f)] = self.manifests[src].files[f].chunk_starts()
        return (int(rows[k - 1]) if k else 0) + int(self._starts[(src, f)][j])

    def bounds(self, src: int, epoch: int, p: int) -> tuple[int, int]:
        """Partition ``p``'s rows ``[lo, hi)`` in the row space of ``epoch``, on chunk boundaries."""
        c = int(self.order(src, epoch)[2][-1])
        k = self.partitions
        return self._row_of_chunk(src, epoch, p * c // k), self._row_of_chunk(src, epoch, (p + 1) * c // k)

    def __getstate__(self):  # the caches are rebuilt where the plan is sent (DataLoader workers)
        return {**self.__dict__, "_orders": {}, "_starts": {}}


def owned(partitions: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s partitions, in the order it takes samples from them."""
    return list(range(rank, partitions, world))


def samples_taken(partition: int, partitions: int, cursor: int) -> int:
    """Samples partition ``partition`` has given after ``cursor`` samples of the global stream."""
    return cursor // partitions + (1 if partition < cursor % partitions else 0)


class PartitionRows:
    """Partition ``p`` of source ``src``: its rows in plan order, epoch after epoch (``loop``) or
    one epoch, read front to back; ``state`` = (epoch, block, index in the block)."""

    def __init__(
        self,
        plan: Plan,
        src: int,
        p: int,
        state: dict[str, int] | None = None,
        loop: bool = True,
        columns: list[str] | None = None,
    ):
        self.plan, self.src, self.p, self.loop, self.columns = plan, src, p, loop, columns
        self.manifest = plan.manifests[src]
        self.size = plan.blocks[src]
        st = state or {"epoch": 0, "block": 0, "idx": 0}
        self.epoch, self.block, self.idx = int(st["epoch"]), int(st["block"]), int(st["idx"])
        self.lo, self.hi = plan.bounds(src, self.epoch, p)
        # rows read and not yet handed out: (file ids, row indices, raw rows), in the order they are handed
        # out (one permuted block, or without shuffling a read's worth of one-row blocks)
        self._buf: tuple[list[int], list[int], Any] | None = None
        self._at = 0
        self._reader: Iterator[tuple[int, int, list[Any]]] | None = None
        self._reader_at = -1
        self._pending: tuple[int, int, list[Any]] | None = None  # a chunk the last block left over

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "block": self.block, "idx": self.idx}

    def state(self) -> tuple[int, int, int]:
        """``state_dict()``'s values: (epoch, block, index in the block)."""
        return self.epoch, self.block, self.idx

    def rows(self, n: int) -> Rows:
        """The next rows, at most ``n``, all of one epoch (and of one block when shuffled); fewer at the
        end of what was read, none at the end of a single pass. The state moves past them."""
        if self._buf is None and not self._fill():
            return Rows(self.manifest, [], [], [])
        fids, indexes, raws = self._buf
        a = self._at
        b = min(a + n, len(raws))
        out = make_rows(self.manifest, fids[a:b], indexes[a:b], raws[a:b])
        self._at = b
        self.took = (self.epoch, self.block, self.idx)  # the state before the first of them
        if self.size == 1:  # one-row blocks: the block number is the row's place in the partition
            self.block += b - a
        else:
            self.idx = b
            if b == len(raws):
                self.block, self.idx = self.block + 1, 0
        if b == len(raws):
            self._buf = None
        return out

    def before(self, k: int) -> tuple[int, Iterable[int], Iterable[int]]:
        """The state before each of the ``k`` rows the last ``rows()`` gave: their epoch, and their
        blocks and indexes in the block (one-row blocks: a row's block is its place in the partition)."""
        e, b, i = self.took
        if self.size == 1:
            return e, range(b, b + k), itertools.repeat(0, k)
        return e, itertools.repeat(b, k), range(i, i + k)

    def _span(self, block: int) -> tuple[int, int]:
        """Block ``block``'s rows. Partition ``p``'s first block is shorter by ``p * B // K`` rows, so
        the partitions of a rank reach their block ends at different samples and the reads spread
        evenly over the pass instead of coming all at once."""
        b = self.size
        shift = (self.p * b) // self.plan.partitions
        return self.lo + max(0, block * b - shift), min(self.hi, self.lo + (block + 1) * b - shift)

    def _fill(self) -> bool:
        start, end = self._span(self.block)
        if start >= self.hi:
            if not self.loop:
                return False
            self.epoch, self.block, self.idx = self.epoch + 1, 0, 0
            self._close()
            self.lo, self.hi = self.plan.bounds(self.src, self.epoch, self.p)
            start, end = self._span(0)
        if self.size == 1:
            end = min(self.hi, start + self.plan.reads[self.src])
        if self._reader is None or self._reader_at != start:
            self._close()
            self._reader, self._reader_at = self._chunks_from(start), start
        fids, indexes, raws = self._read(start, end)
        self._reader_at = end
        perm = None
        if self.plan.shuffle and self.size > 1 and len(fids) > 1:
            perm = np.random.default_rng(
                [self.plan.seed, self.src, self.epoch, self.p, self.block]
            ).permutation(len(fids))
            fids, indexes = fids[perm], indexes[perm]
        self._buf = (fids.tolist(), indexes.tolist(), _in_order(raws, perm))
        self._at = self.idx if self.size > 1 else 0
        return True

    def _read(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list]:
        """Rows ``[start, end)`` from the reader: (file ids, row indices, the runs of raw rows)."""
        n = end - start
        fids, indexes, runs, have = [], [], [], 0
        while have < n:
            chunk = self._pending or next(self._reader, None)
            self._pending = None
            if chunk is None:
                raise DataError(
                    f"{self.manifest.key}: a file holds fewer rows than when it was indexed (partition {self.p}, "
                    f"epoch {self.epoch}, rows {start}-{end - 1}): it changed during the run; restore it, or start "
                    "a new run on the new data"
                )
            fid, first, got = chunk
            k = min(len(got), n - have)
            if k < len(got):
                self._pending = (fid, first + k, got[k:])
                got = got[:k]
            fids.append(np.full(k, fid, dtype=np.int64))
            indexes.append(np.arange(first, first + k, dtype=np.int64))
            runs.append(got)
            have += k
        return np.concatenate(fids), np.concatenate(indexes), runs

    def _chunks_from(self, start: int) -> Iterator[tuple[int, int, list[Any]]]:
        """The epoch's rows from row ``start`` of its row space to the partition's end, file after
        file, in lists of consecutive rows: (file id, index of the first row, raw rows)."""
        order, cum, _ = self.plan.order(self.src, self.epoch)
        k = int(np.searchsorted(cum, start, side="right"))
        r, at = start - (int(cum[k - 1]) if k else 0), start
        m = self.manifest
        for i in order[k:].tolist():
            if at >= self.hi:
                return
            stop = min(int(m.rows[i]), r + self.hi - at)
            first = r
            for raws in iter_raw(m, i, r, self.columns, stop, self.plan.reads[self.src]):
                yield i, first, raws
                first += len(raws)
            if first < stop:  # the file ended early: the block being read reports it
                return
            at += stop - r
            r = 0

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._pending = None, None


class _ArrowRows:
    """A block's Arrow rows as Python values a column at a time (one ``to_pylist()`` call each),
    permuted by moving references (an Arrow ``take`` would copy every value first), made the
    dicts a record batch's ``to_pylist()`` gives a slice at a time as they are handed out."""

    def __init__(self, table, perm: np.ndarray | None):
        self.n, self.names = table.num_rows, table.schema.names
        cols = [c.to_pylist() for c in table.columns]
        if perm is not None:
            order = perm.tolist()
            cols = [[c[i] for i in order] for c in cols]
        self.columns = cols

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> list[dict]:
        cols = [c[rows] for c in self.columns]
        if len(cols) == 1:
            (name,) = self.names
            return [{name: v} for v in cols[0]]
        if len(cols) == 2:
            x, y = self.names
            return [{x: u, y: v} for u, v in zip(*cols, strict=True)]
        names = self.names
        return [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]


def _in_order(runs: list, perm: np.ndarray | None):
    """The rows of ``runs`` (lists, or Arrow record batches whose rows become dicts) in one
    sequence, permuted by ``perm``."""
    if runs and not isinstance(runs[0], list):
        import pyarrow as pa

        if all(r.schema == runs[0].schema for r in runs):
            return _ArrowRows(pa.Table.from_batches(runs), perm)
        runs = [r.to_pylist() for r in runs]
    rows = runs[0] if len(runs) == 1 else [r for run in runs for r in run]
    return rows if perm is None else [rows[i] for i in perm.tolist()]


class Doc(NamedTuple):
    """A row as a partition hands it out: the partition's position before it (``docs`` rows read;
    its source ``src`` at ``epoch``, ``block`` and ``idx``, the other sources as ``states`` has them),
    and the row itself (the fields of a ``Row``)."""

    docs: int
    src: int
    epoch: int
    block: int
    idx: int
    states: tuple[tuple[int, int, int], ...]
    file: str
    index: int
    value: dict[str, Any] | None
    error: str | None
    file_id: int

    @property
    def where(self) -> str:
        return row_where(self.file, self.index)

    def position(self, offset: int, count: int) -> dict[str, Any]:
        """The partition's saved position for a sample that ends ``offset`` units into this row."""
        sources = [{"epoch": e, "block": b, "idx": i} for e, b, i in self.states]
        sources[self.src] = {"epoch": self.epoch, "block": self.block, "idx": self.idx}
        return {"docs": self.docs, "sources": sources, "offset": offset, "count": count}


_new_doc = functools.partial(tuple.__new__, Doc)  # a Doc from a tuple of its fields, without a Python call


class Prepared(NamedTuple):
    """A row made ready to pack: ``units`` (token ids, or a list of samples), or why it is unusable."""

    units: Any
    kind: str = ""
    msg: str = ""


class Sample(NamedTuple):
    data: Any
    pos: dict[str, Any]
    errors: np.ndarray


class TokenPacker:
    """Documents' tokens joined and cut into windows of ``seq_len``; a window ends inside (or at the
    end of) the document being read, so (position before it, token offset) resumes it."""

    def __init__(self, seq_len: int):
        self.seq_len, self.buf, self.have = seq_len, [], 0

    def feed(self, toks: np.ndarray, skip: int) -> Iterator[tuple[np.ndarray, int]]:
        off = skip
        while self.have + len(toks) - off >= self.seq_len:
            need = self.seq_len - self.have
            self.buf.append(toks[off : off + need])
            off += need
            window = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
            self.buf, self.have = [], 0
            yield window, off
        if off < len(toks):
            self.buf.append(toks[off:])
            self.have += len(toks) - off


class ItemPacker:
    """Each unit of a row is one sample (an image row has one)."""

    def feed(self, units: list, skip: int) -> Iterator[tuple[Any, int]]:
        for i in range(skip, len(units)):
            yield units[i], i + 1


class Partition:
    """One partition's samples with the position after each: rows from its sources (mixed by
    weight), made ready by ``prepare`` (here, in a DataLoader worker or in a Ray actor), bad rows
    counted or refused, packed. The same class for both engines."""

    def __init__(
        self,
        plan: Plan,
        p: int,
        state: dict[str, Any] | None,
        packer,
        prepare: Callable[[Doc], Prepared] | None,
        on_error: str,
        loop: bool = True,
        columns: list[str] | None = None,
    ):
        self.plan, self.p, self.packer, self.prepare, self.on_error = plan, p, packer, prepare, on_error
        n = len(plan.manifests)
        st = state or {"docs": 0, "sources": [None] * n, "offset": 0, "count": 0}
        if len(st["sources"]) != n:
            raise DataError(f"the saved data position has {len(st['sources'])} sources, this run {n}")
        self.cursors = [PartitionRows(plan, s, p, st["sources"][s], loop, columns) for s in range(n)]
        self.docs, self.skip, self.count = int(st["docs"]), int(st["offset"]), int(st["count"])
        self.errors = np.zeros(len(ERROR_KINDS), dtype=np.int64)
        self.last_good = [c.epoch - 1 for c in self.cursors]

    def read(self, n: int = 1) -> list[Doc]:
        """The next ``n`` rows (fewer at the end of a single pass)."""
        out: list[Doc] = []
        single = len(self.cursors) == 1
        while len(out) < n:
            src = 0
            if not single:
                u = random.Random(f"{self.plan.seed}:{self.p}:{self.docs}").random()
                src = min(int(np.searchsorted(self.plan.cum_weights, u, side="right")), len(self.cursors) - 1)
            cur = self.cursors[src]
            rows = cur.rows(n - len(out) if single else 1)
            k = len(rows)
            if not k:
                break
            e, blocks, idxs = cur.before(k)
            fields = (
                range(self.docs, self.docs + k),
                itertools.repeat(src),
                itertools.repeat(e),
                blocks,
                idxs,
                itertools.repeat(tuple(c.state() for c in self.cursors)),
                map(rows.manifest.paths.__getitem__, rows.fids),
                rows.indexes,
                rows.values,
                rows.errors or itertools.repeat(None),
                rows.fids,
            )
            out += map(_new_doc, zip(*fields, strict=False))  # the repeats are endless
            self.docs += k
        return out

    def take(self, doc: Doc, prepared: Prepared) -> list[Sample]:
        """The samples that ``doc`` completes (none for a bad row, or a document shorter than what a
        window still needs)."""
        if prepared.units is None:
            where = doc.where
            if self.on_error == "fail":
                raise DataError(f"{where}: {prepared.msg}; fix the row or set data.on_error=skip")
            self.errors[ERROR_KINDS.index(prepared.kind)] += 1
            n = int(self.errors.sum())
            if n <= 3 or n % 1000 == 0:
                log.warning("skipping %s: %s (data.on_error=skip)", where, prepared.msg)
            self.skip = 0
            if doc.epoch - self.last_good[doc.src] >= 2:
                m = self.plan.manifests[doc.src]
                lo, hi = self.plan.bounds(doc.src, doc.epoch, self.p)
                raise DataError(
                    f"data: no usable row in a whole epoch of partition {self.p} of {m.key} (its rows {lo}-{hi - 1} "
                    f"of {m.total} in {[f.path for f in m.files[:3]]}; last: {where}); check data.text_field and "
                    "data.format, or remove the bad rows, or lower data.partitions"
                )
            return []
        self.last_good[doc.src] = doc.epoch
        skip, self.skip = self.skip, 0
        out = []
        for data, off in self.packer.feed(prepared.units, skip):
            self.count += 1
            out.append(Sample(data, doc.position(off, self.count), self.errors.copy()))
            self.errors[:] = 0
        return out

    def step(self, n: int = 8) -> list[Sample] | None:
        """Read up to ``n`` rows and make their samples here; None at the end of a single pass."""
        docs = self.read(n)
        if not docs:
            return None
        return [s for doc in docs for s in self.take(doc, self.prepare(doc))]


class Assembler:
    """This rank's samples in plan order: its partitions in turn, one sample each, starting where
    ``count`` samples were taken. ``fill(i, push)`` must push at least one sample of local
    partition ``i`` (and may push others'), through ``push(i, sample)``. Records the position of
    every partition's last sample taken."""

    def __init__(self, partitions: list[int], count: int, positions: dict[int, Any], fill):
        self.partitions, self.count, self.fill = partitions, count, fill
        self.queues: list[deque[Sample]] = [deque() for _ in partitions]
        self.positions = dict(positions)

    def push(self, i: int, sample: Sample) -> None:
        """A sample of local partition ``i``."""
        self.queues[i].append(sample)

    def take(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            i = self.count % len(self.partitions)
            q = self.queues[i]
            while not q:
                self.fill(i, self.push)
            s = q.popleft()
            self.positions[self.partitions[i]] = s.pos
            self.count += 1
            out.append(s)
        return out
