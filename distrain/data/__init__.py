"""Data pipelines: every source indexed by a manifest, one plan for the order (``distrain.data.plan``),
each rank reading only its partitions front to back, and one global cursor that a checkpoint stores
and a resume on any world size continues exactly. Rows are decoded off the training thread: by a
prefetch thread, ``data.num_workers`` DataLoader workers, or Ray actors (``data.engine: ray``)."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from distrain.config import Config
from distrain.data.plan import (
    ERROR_KINDS,
    Assembler,
    ItemPacker,
    Partition,
    Plan,
    Sample,
    TokenPacker,
    default_partitions,
    owned,
    samples_taken,
)
from distrain.data.sources import DataError, Manifest, build_manifest, detect_format
from distrain.data.tokenizer import load_tokenizer
from distrain.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["ERROR_KINDS", "Corpus", "DataError", "DataPipeline", "to_device"]

STATE_VERSION = 2


class Corpus:
    """The training sources' manifests as a job-wide checkpoint part: saved with every checkpoint,
    and a resume on changed data is refused with the file named (with ``data.restart_order`` it
    is let through: the data position then restarts, see ``DataPipeline.load_state_dict``)."""

    def __init__(self, manifests: list[Manifest], restart_order: bool = False):
        self.manifests, self.restart_order = manifests, restart_order

    def state_dict(self) -> dict[str, Any]:
        return {"sources": [m.summary() for m in self.manifests]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["sources"]
        try:
            if len(saved) != len(self.manifests):
                raise DataError(
                    f"the checkpoint's data had {len(saved)} sources, this run has {len(self.manifests)}: "
                    "resume with the same data.sources"
                )
            for m, s in zip(self.manifests, saved, strict=True):
                m.check_same(s)
        except DataError as exc:
            if not self.restart_order:
                raise DataError(f"{exc} (or set data.restart_order=true to restart the data order)") from None
            log.warning("data: %s; data.restart_order=true: the data order restarts", exc)


class PartitionMaker:
    """Builds partition ``p`` from a saved position (picklable: DataLoader workers build their own)."""

    def __init__(self, plan: Plan, prepare, seq_len: int | None, on_error: str, columns, loop: bool = True):
        self.plan, self.prepare, self.seq_len = plan, prepare, seq_len
        self.on_error, self.columns, self.loop = on_error, columns, loop

    def __call__(self, p: int, state: dict[str, Any] | None) -> Partition:
        packer = TokenPacker(self.seq_len) if self.seq_len else ItemPacker()
        return Partition(self.plan, p, state, packer, self.prepare, self.on_error, self.loop, self.columns)


class WorkerRounds(torch.utils.data.IterableDataset):
    """DataLoader worker ``k`` of ``m`` makes the samples of local partitions ``l = k (mod m)``, one
    round (a sample of each) per item; the DataLoader's worker-by-worker order then hands the rank
    its partitions in turn."""

    def __init__(self, make: PartitionMaker, parts: list[tuple[int, int, Any]], images: bool):
        super().__init__()
        self.make, self.parts, self.images = make, parts, images

    def __iter__(self):
        import numpy as np

        info = torch.utils.data.get_worker_info()
        k, m = (info.id, info.num_workers) if info else (0, 1)
        mine = [(i, self.make(p, st)) for i, p, st in self.parts if i % m == k]
        pending: dict[int, list[Sample]] = {i: [] for i, _ in mine}
        while True:
            got = []
            for i, part in mine:
                while not pending[i]:
                    pending[i] = part.step()
                got.append(pending[i].pop(0))
            item = {
                "l": [i for i, _ in mine],
                "pos": [s.pos for s in got],
                "err": np.stack([s.errors for s in got]),
            }
            if self.images:
                item["x"] = torch.stack([s.data[0] for s in got])
                item["y"] = [s.data[1] for s in got]
            else:
                item["x"] = np.stack([s.data for s in got])
            yield item


def _identity(x):
    return x


class Prefetch:
    """Batches made by a thread of their own, ``depth`` ahead; its errors re-raised in the caller."""

    def __init__(self, batches: Iterator, depth: int, pin: bool, closers=()):
        self.batches, self.pin, self.closers = batches, pin, list(closers)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distrain-data", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.batches:
                if self.pin:
                    item = ({k: v.pin_memory() for k, v in item[0].items()}, item[1])
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failed(exc))

    def _put(self, item) -> bool:
        """Queue ``item`` unless the stream is being closed (False then)."""
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self):
        item = self.q.get()
        if isinstance(item, _Failed):
            self.q.put(item)  # every later call raises it too
            raise item.exc
        return item

    def close(self) -> None:
        self.stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=10)
        for close in self.closers:
            close()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Stream:
    """The endless training stream of one rank; hands the position after each batch it gives to
    ``taken`` (the pipeline's, which remembers it)."""

    def __init__(self, source, taken: Callable[[dict[str, Any]], None]):
        self.source, self.taken = source, taken

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch, snap = next(self.source)
        self.taken(snap)
        return batch

    def close(self) -> None:
        self.source.close()


def image_manifest(cfg: Config, path: str, key: str, split: str) -> Manifest:
    """An image source's manifest, its classes checked against model.num_classes."""
    d, m = cfg.data, cfg.model
    fmt = detect_format(path, d.format, key)
    if fmt not in ("imagefolder", "parquet", "hf"):
        raise DataError(
            f"{key}: data.format={fmt} holds no images; model.name={m.name} needs imagefolder, parquet or hf"
        )
    man = build_manifest(path, fmt, key, split)
    if fmt == "imagefolder":
        top = len(man.classes)
    else:
        from distrain.data.vision import max_label

        top = max_label(man, d.label_field) + 1
    if top > m.num_classes:
        raise DataError(
            f"{key}: {path} has {top} classes but model.num_classes={m.num_classes}; set model.num_classes >= {top}"
        )
    return man


def train_manifests(cfg: Config) -> tuple[list[Manifest], list[float]]:
    """The training sources' manifests (built once and cached, see ``distrain data index``) and
    their mixing weights; a missing path, a format that does not fit the model or more classes
    than model.num_classes is refused naming the key."""
    d = cfg.data
    if cfg.model.batch_kind != "tokens":
        return [image_manifest(cfg, d.train_path, "data.train_path", d.split)], [1.0]
    paths = [(s.path, s.weight) for s in d.sources] if d.sources else [(d.train_path, 1.0)]
    manifests, weights = [], []
    for i, (path, weight) in enumerate(paths):
        key = f"data.sources[{i}].path" if d.sources else "data.train_path"
        fmt = detect_format(path, d.format, key)
        if fmt == "imagefolder":
            raise DataError(f"{key} {path} is an image folder but model.name={cfg.model.name} trains on text")
        manifests.append(build_manifest(path, fmt, key, d.split))
        weights.append(weight)
    return manifests, weights


def eval_manifest(cfg: Config) -> Manifest | None:
    """data.eval_path's manifest (None without one)."""
    d, key = cfg.data, "data.eval_path"
    if not d.eval_path:
        return None
    if cfg.model.batch_kind != "tokens":
        return image_manifest(cfg, d.eval_path, key, d.eval_split)
    return build_manifest(d.eval_path, detect_format(d.eval_path, d.format, key), key, d.eval_split)


class DataPipeline:
    """Builds the train stream and eval batches for one rank of ``world``."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.cfg, self.rank, self.world, self.pin = cfg, rank, world, pin_memory
        self.kind = cfg.model.batch_kind
        d = cfg.data
        self.manifests, weights = train_manifests(cfg)
        if self.kind == "tokens":
            self.tokenizer = load_tokenizer(d.tokenizer)
            if self.tokenizer.vocab_size > cfg.model.vocab_size:
                raise ConfigError(
                    f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of data.tokenizer="
                    f"{d.tokenizer} ({self.tokenizer.vocab_size}); set model.vocab_size >= {self.tokenizer.vocab_size}"
                )
            self.tokens_per_sample: int | None = d.seq_len
        else:
            self.tokenizer, self.tokens_per_sample = None, None
        self.corpus = Corpus(self.manifests, d.restart_order)
        self.restarts: list[dict[str, Any]] = []  # data.restart_order: the resumes that restarted it
        k = d.partitions or default_partitions(self.manifests, [world])
        self.plan = Plan(
            self.manifests, weights, cfg.run.seed, k, d.shuffle_block, d.shuffle, block_mb=d.shuffle_block_mb
        )
        self._check_layout()
        self._start: dict[str, Any] = {"count": 0, "positions": {}}
        self._consumed: dict[str, Any] | None = None
        self._stream: Stream | None = None

    # ------------------------------------------------------------------ parts
    def _check_layout(self) -> None:
        k, w, m = self.plan.partitions, self.world, self.cfg.data.num_workers
        if k % w:
            raise ConfigError(
                f"data.partitions={k} is not divisible by the world size {w}: every rank reads data.partitions / "
                f"world size partitions; set data.partitions to a multiple of {w} (and of every world size you will resume on)"
            )
        if self.cfg.data.engine == "torch" and m > k // w:
            raise ConfigError(
                f"data.num_workers={m} but each rank reads data.partitions / world size = {k // w} partitions; "
                f"set data.num_workers <= {k // w} or raise data.partitions"
            )

    def _maker(self, plan: Plan, train: bool, loop: bool = True) -> PartitionMaker:
        d = self.cfg.data
        if self.kind == "tokens":
            from distrain.data.text import TokenizeRows

            prepare = TokenizeRows(self.tokenizer, [m.fmt for m in plan.manifests], d.text_field)
            return PartitionMaker(plan, prepare, d.seq_len, d.on_error, [d.text_field], loop)
        from distrain.data.vision import DecodeImages

        man = plan.manifests[0]
        prepare = DecodeImages(self.cfg, train, man.fmt)
        columns = None if man.fmt == "imagefolder" else [d.image_field, d.label_field]
        return PartitionMaker(plan, prepare, None, d.on_error, columns, loop)

    def _collate(self):
        if self.kind == "tokens":
            from distrain.data.text import collate_text

            return collate_text
        from distrain.data.vision import CollateImages

        return CollateImages(self.cfg)

    # ---------------------------------------------------------------- streams
    def train_batches(self) -> Iterator[dict[str, Any]]:
        """Endless stream of training micro-batches for this rank, from the restored position if any.
        Building it draws nothing from the run's random streams (a resumed run restores those
        before its stream exists)."""
        if self._stream is None:
            with torch.random.fork_rng(devices=[]):
                self._stream = Stream(self._source(), self._taken)
        return self._stream

    def _taken(self, snap: dict[str, Any]) -> None:
        """The position after the last batch the stream handed out."""
        self._consumed = snap

    def _source(self) -> Prefetch:
        """This rank's batches in plan order, prefetched; the samples come from the partitions
        by ``data.engine`` and ``data.num_workers`` (Ray actors, inline, or DataLoader workers)."""
        d, start = self.cfg.data, self._start
        ids = owned(self.plan.partitions, self.rank, self.world)
        make = self._maker(self.plan, train=True)
        mb, collate = self.cfg.train.micro_batch_size, self._collate()
        if d.engine == "ray":
            fill, closers = self._ray_fill(make, ids, mb)
        elif d.num_workers == 0:
            fill, closers = self._inline_fill(make, ids)
        else:
            fill, closers = self._worker_fill(make, ids)
        asm = Assembler(ids, start["count"], start["positions"], fill)

        def batches():
            while True:
                samples = asm.take(mb)
                yield collate(samples), {"count": asm.count, "positions": dict(asm.positions)}

        return Prefetch(batches(), max(2, d.prefetch_factor), self.pin, closers=closers)

    def _ray_fill(self, make: PartitionMaker, ids: list[int], mb: int):
        """data.engine=ray: Ray Data actors prepare the partitions (``RayFill``)."""
        from distrain.data.raydata import RayFill

        if self.world > 1 and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(
                "data.engine=ray with several training processes needs a Ray cluster (RAY_ADDRESS); use data.engine=torch under torchrun"
            )
        parts = [make(p, self._start["positions"].get(p)) for p in ids]
        fill = RayFill(parts, make.prepare, self.cfg.data.ray_actors, images=self.kind == "images", mb=mb)
        return fill, [fill.close]

    def _inline_fill(self, make: PartitionMaker, ids: list[int]):
        """data.num_workers=0: the partitions are read in this process."""
        parts = [make(p, self._start["positions"].get(p)) for p in ids]

        def fill(i: int, push) -> None:
            for s in parts[i].step():
                push(i, s)

        return fill, []

    def _worker_fill(self, make: PartitionMaker, ids: list[int]):
        """data.num_workers > 0: DataLoader workers read rounds of the partitions (``WorkerRounds``)."""
        d, images = self.cfg.data, self.kind == "images"
        rounds = WorkerRounds(
            make, [(i, p, self._start["positions"].get(p)) for i, p in enumerate(ids)], images
        )
        loader = torch.utils.data.DataLoader(
            rounds,
            batch_size=None,
            num_workers=d.num_workers,
            prefetch_factor=d.prefetch_factor,
            collate_fn=_identity,
        )
        it = iter(loader)  # here, under fork_rng: the DataLoader draws its base seed now

        def fill(_l: int, push) -> None:
            item = next(it)
            for j, i in enumerate(item["l"]):
                data = (item["x"][j], item["y"][j]) if images else item["x"][j]
                push(i, Sample(data, item["pos"][j], item["err"][j]))

        return fill, [lambda: getattr(it, "_shutdown_workers", lambda: None)()]

    def close(self) -> None:
        """Stop what feeds the stream (the prefetch thread, DataLoader workers, Ray actors)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    # ---------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (prefetched batches are not counted): the
        global cursor and where each of this rank's partitions stands."""
        snap = self._consumed or self._start
        mine = owned(self.plan.partitions, self.rank, self.world)
        return {
            "version": STATE_VERSION,
            "cursor": snap["count"] * self.world,
            "world": self.world,
            "rank": self.rank,
            "plan": self.plan.key(),
            "partitions": {p: snap["positions"][p] for p in mine if p in snap["positions"]},
            "restarts": self.restarts,
        }

    def load_state_dict(self, state) -> None:
        """Restore a position: this rank's own ``state_dict()``, or a checkpoint's ``SavedRanks``
        (at another world size every saved rank's partitions are read, and this rank takes its own)."""
        from distrain.checkpoint import SavedRanks

        if self._stream is not None:
            raise RuntimeError("load the data position before the first batch is drawn")
        if isinstance(state, SavedRanks):
            states = [state.own()] if state.same_world else state.all()
            if (states[0]["world"], states[0]["rank"]) != (self.world, self.rank):
                states = state.all()  # the same ranks, split into another number of data-parallel ones
        else:
            states = [state]
        self.restarts = list(states[0].get("restarts", []))
        why = self._position_problem(states[0])
        if why is not None:
            if not self.cfg.data.restart_order:
                raise DataError(
                    f"the checkpoint's data position cannot be continued: {why}. Resume with what the run was "
                    "started with, or set data.restart_order=true to restart the data order at the start of the "
                    "epoch it had reached (the run records it)"
                )
            self._restart(states, why)
            return
        cursors = {s["cursor"] for s in states}
        if len(cursors) != 1:
            raise CheckpointError(
                f"the saved data positions of the ranks disagree (cursors {sorted(cursors)})"
            )
        cursor = cursors.pop()
        k = self.plan.partitions
        if cursor % self.world:
            raise DataError(
                f"the data cursor is at sample {cursor} of the global stream, which does not divide over {self.world} ranks; "
                "resume on a world size that divides it (keep train.global_batch_size: micro batch x grad_accum x world size)"
            )
        merged: dict[int, Any] = {}
        for s in states:
            merged.update(s["partitions"])
        mine = owned(k, self.rank, self.world)
        positions = {p: merged[p] for p in mine if p in merged}
        for p in mine:
            want, got = samples_taken(p, k, cursor), positions.get(p, {"count": 0})["count"]
            if want != got:
                raise CheckpointError(
                    f"the saved data position of partition {p} is at sample {got}, the cursor {cursor} says {want}"
                )
        self._start = {"count": cursor // self.world, "positions": positions}
        saved_world = states[0]["world"]
        if saved_world != self.world and self.rank == 0:
            log.info(
                "data: world size %d -> %d, continuing at sample %d of the global stream",
                saved_world,
                self.world,
                cursor,
            )

    def _position_problem(self, saved: dict[str, Any]) -> str | None:
        """Why this run cannot continue a saved position, naming the key, or None."""
        if saved.get("version") != STATE_VERSION:
            return f"it was saved by data-state version {saved.get('version')}, this distrain reads {STATE_VERSION}"
        now, was_plan = self.plan.key(), saved["plan"]
        keys = {
            "partitions": "data.partitions",
            "block": "data.shuffle_block",
            "block_mb": "data.shuffle_block_mb",
            "shuffle": "data.shuffle",
            "seed": "run.seed",
        }
        for k, name in keys.items():
            was = was_plan.get(k)  # None for positions saved before data.shuffle_block_mb
            if was != now[k]:
                was, is_ = ("null" if v is None else v for v in (was, now[k]))
                return f"it was saved with {name}={was}, this run has {is_} (resume with {name}={was})"
        if was_plan.get("blocks", now["blocks"]) != now["blocks"]:
            return (
                f"it was saved with shuffle blocks of {was_plan['blocks']} rows per source, this run derives "
                f"{now['blocks']} from data.shuffle_block_mb and the rows' size (resume with the data and the "
                "versions of distrain and pyarrow the run was started with)"
            )
        if was_plan["digests"] != now["digests"]:
            return (
                "the training data changed since the checkpoint (resume with the data the run was started on)"
            )
        return None

    def _restart(self, states: list[dict[str, Any]], why: str) -> None:
        """data.restart_order: every partition at the start of the earliest epoch any had reached."""
        try:
            epoch = min(
                src["epoch"]
                for s in states
                for pos in s["partitions"].values()
                for src in pos["sources"]
                if src
            )
        except (KeyError, TypeError, ValueError, AttributeError):  # a layout this code does not know
            epoch = 0
        n = len(self.plan.manifests)
        start = {"docs": 0, "sources": [{"epoch": epoch, "block": 0, "idx": 0}] * n, "offset": 0, "count": 0}
        mine = owned(self.plan.partitions, self.rank, self.world)
        self._start = {"count": 0, "positions": {p: dict(start) for p in mine}}
        self.restarts.append({"epoch": epoch, "why": why})
        if self.rank == 0:
            log.warning("data: %s; data.restart_order=true: the data order restarts at epoch %d", why, epoch)

    # ------------------------------------------------------------------- eval
    def eval_batches(self) -> list[dict[str, Any]] | None:
        """The same (at most ``train.eval_batches``) held-out micro-batches every time; None without
        data.eval_path. Rank r reads the r-th of ``world`` contiguous shares, unshuffled; ranks can
        hold different numbers of batches (the trainer agrees a count)."""
        d = self.cfg.data
        if not d.eval_path:
            return None
        if not hasattr(self, "_eval_cache"):
            man = eval_manifest(self.cfg)
            plan = Plan([man], [1.0], 0, self.world, 1, False, check_rows=False)
            part = self._maker(plan, train=False, loop=False)(self.rank, None)
            mb, collate, n = self.cfg.train.micro_batch_size, self._collate(), self.cfg.train.eval_batches
            batches, samples = [], []
            while len(batches) < n and (got := part.step()) is not None:
                samples += got
                while len(samples) >= mb and len(batches) < n:
                    batches.append(collate(samples[:mb]))
                    samples = samples[mb:]
            self._eval_cache = batches
        return self._eval_cache


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if k == "data_errors":
            continue
        v = v.to(device, non_blocking=True)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out
