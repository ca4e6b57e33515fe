"""Data pipelines: per-rank sharded, decoded off the training thread when ``data.num_workers`` > 0,
with a position (``state_dict``) that a checkpoint stores and a resume restores exactly."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from distrain.config import Config
from distrain.data.sources import DataError, detect_format, resolve_files
from distrain.data.text import ERROR_KINDS
from distrain.data.tokenizer import load_tokenizer
from distrain.errors import ConfigError

log = logging.getLogger(__name__)
# torchdata's StatefulDataLoader calls a deprecated torch API on every construction; nothing to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

__all__ = ["ERROR_KINDS", "DataError", "DataPipeline", "to_device"]


class DataPipeline:
    """Builds the train stream and eval batches for one rank of ``world``."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.cfg, self.rank, self.world, self.pin = cfg, rank, world, pin_memory
        self.kind = cfg.model.batch_kind
        d = cfg.data
        self._loader = None
        self._pending_state: dict[str, Any] | None = None
        self.start_epoch = 0  # a fresh stream's first epoch (continue_epoch_of sets it)
        if self.kind == "tokens":
            paths = [(s.path, s.weight) for s in d.sources] if d.sources else [(d.train_path, 1.0)]
            self.sources = []
            for i, (path, weight) in enumerate(paths):
                key = f"data.sources[{i}].path" if d.sources else "data.train_path"
                fmt = detect_format(path, d.format, key)
                if fmt == "imagefolder":
                    raise DataError(
                        f"{key} {path} is an image folder but model.name={cfg.model.name} trains on text"
                    )
                self.sources.append((resolve_files(path, key), fmt, weight))
            self.tokenizer = load_tokenizer(d.tokenizer)
            if self.tokenizer.vocab_size > cfg.model.vocab_size:
                raise ConfigError(
                    f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of data.tokenizer="
                    f"{d.tokenizer} ({self.tokenizer.vocab_size}); set model.vocab_size >= {self.tokenizer.vocab_size}"
                )
            self.tokens_per_sample: int | None = d.seq_len
        else:
            fmt = detect_format(d.train_path, d.format, "data.train_path")
            if fmt not in ("imagefolder", "parquet"):
                raise DataError(
                    f"data.format={fmt} holds no images; model.name={cfg.model.name} needs imagefolder or parquet"
                )
            self.tokenizer = None
            self.tokens_per_sample = None

    # ------------------------------------------------------------------ text
    def _text_dataset(self, sources, train: bool):
        from distrain.data.text import PackedText

        d = self.cfg.data
        return PackedText(
            sources,
            self.tokenizer,
            d.seq_len,
            d.text_field,
            self.rank,
            self.world,
            seed=self.cfg.run.seed,
            shuffle=d.shuffle and train,
            loop=train,
            block=d.shuffle_block,
            on_error=d.on_error,
            batch_size=self.cfg.train.micro_batch_size,
            start_epoch=self.start_epoch if train else 0,
        )

    # ---------------------------------------------------------------- images
    def _image_dataset(self, path: str, train: bool):
        from distrain.data.vision import ImageFolderDataset, ParquetImageDataset, build_transform

        d, m = self.cfg.data, self.cfg.model
        key = "data.train_path" if train else "data.eval_path"
        tf = build_transform(self.cfg, train)
        fmt = detect_format(path, d.format, key)
        if fmt == "imagefolder":
            ds = ImageFolderDataset(path, tf, m.in_channels, key, seed=self.cfg.run.seed, on_error=d.on_error)
        else:
            ds = ParquetImageDataset(
                path,
                d.image_field,
                d.label_field,
                tf,
                m.in_channels,
                key,
                seed=self.cfg.run.seed,
                on_error=d.on_error,
            )
        top = len(ds.classes) if fmt == "imagefolder" else max(ds.classes) + 1
        if top > m.num_classes:
            raise DataError(
                f"{key}: {path} has {top} classes but model.num_classes={m.num_classes}; set model.num_classes >= {top}"
            )
        if len(ds) < self.cfg.train.micro_batch_size * self.world:
            raise DataError(
                f"{key}: {path} has {len(ds)} images, fewer than train.micro_batch_size x world size = {self.cfg.train.micro_batch_size * self.world}"
            )
        return ds

    # ---------------------------------------------------------------- loaders
    def _train_loader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        d, t = self.cfg.data, self.cfg.train
        workers = {"num_workers": d.num_workers}
        if d.num_workers:
            workers.update(prefetch_factor=d.prefetch_factor, persistent_workers=False)
        if self.kind == "tokens":
            return StatefulDataLoader(
                self._text_dataset(self.sources, True),
                batch_size=None,  # PackedText yields whole micro-batches
                pin_memory=self.pin,
                **workers,
            )
        from distrain.data.vision import EpochSampler, collate

        ds = self._image_dataset(d.train_path, train=True)
        sampler = EpochSampler(
            len(ds), self.rank, self.world, self.cfg.run.seed, d.shuffle, start_epoch=self.start_epoch
        )
        return StatefulDataLoader(
            ds,
            batch_size=t.micro_batch_size,
            sampler=sampler,
            collate_fn=collate,
            drop_last=True,
            pin_memory=self.pin,
            **workers,
        )

    def _ray_stream(self):
        from distrain.data import raydata

        if self.world > 1 and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(
                "data.engine=ray with several training processes needs a Ray cluster (RAY_ADDRESS); use data.engine=torch under torchrun"
            )
        d = self.cfg.data
        if self.kind == "tokens":
            files, fmt, _ = self.sources[0]
            return raydata.RayPackedText(
                files, fmt, self.tokenizer, self.cfg, self.rank, self.world, d.ray_actors, self.start_epoch
            )
        return raydata.RayImages(self.cfg, self.rank, self.world, d.ray_actors, self.start_epoch)

    def train_batches(self) -> Iterator[dict[str, Any]]:
        """Endless stream of training micro-batches for this rank, from the restored position if any.
        Building it draws nothing from the run's random streams (a resumed run restores those
        before its stream exists)."""
        with torch.random.fork_rng(devices=[]):
            if self._loader is None:
                self._loader = self._ray_stream() if self.cfg.data.engine == "ray" else self._train_loader()
                if self._pending_state is not None:
                    self._loader.load_state_dict(self._pending_state)
            self._iter = iter(self._loader)
        return self._iter

    def continue_epoch_of(self, states: list[dict[str, Any]]) -> int:
        """Start this (fresh) pipeline at the epoch the saved positions had reached, the earliest
        over ranks and sources: the positions of another world size cannot be continued exactly,
        the epoch count can. Returns that epoch."""
        if self._loader is not None:
            raise RuntimeError("set the starting epoch before the first batch is drawn")
        epochs = [e for st in states for e in _epochs(st)]
        self.start_epoch = min(epochs) if epochs else 0
        return self.start_epoch

    def close(self) -> None:
        """Stop what feeds the stream (DataLoader workers, Ray Data executions)."""
        it, self._iter = getattr(self, "_iter", None), None
        if it is not None and hasattr(it, "close"):
            it.close()

    def _layout(self) -> dict[str, Any]:
        d = self.cfg.data
        return {
            "world": self.world,
            "rank": self.rank,
            "engine": d.engine,
            "num_workers": d.num_workers if d.engine == "torch" else 0,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (prefetched batches are not counted)."""
        loader = self._pending_state if self._loader is None else self._loader.state_dict()
        return {"layout": self._layout(), "loader": loader}

    def load_state_dict(self, state) -> None:
        """Restore a position: this rank's own ``state_dict()``, or a checkpoint's ``SavedRanks``.
        Saved at another world size, each position belongs to the old sharding: the stream starts
        at the epoch the saved positions had reached (the earliest over ranks and sources)."""
        from distrain.checkpoint import SavedRanks

        if isinstance(state, SavedRanks):
            if not state.same_world:
                epoch = self.continue_epoch_of(state.all())
                if self.rank == 0:
                    log.warning(
                        "world size changed from %d to %d: the data continues from the start of epoch %d "
                        "(positions within an epoch belong to the old sharding)",
                        state.saved_world,
                        self.world,
                        epoch,
                    )
                return
            state = state.own()
        if self._loader is not None:
            raise RuntimeError("load the data position before the first batch is drawn")
        saved, now = state.get("layout"), self._layout()
        if saved is not None and saved != now:
            raise DataError(
                f"the saved data position was taken with world size {saved['world']}, data.engine={saved['engine']}, "
                f"data.num_workers={saved['num_workers']} (rank {saved['rank']}); this run has world size {now['world']}, "
                f"data.engine={now['engine']}, data.num_workers={now['num_workers']} (rank {now['rank']}): resume with the same layout"
            )
        self._pending_state = state.get("loader")

    def eval_batches(self) -> list[dict[str, Any]] | None:
        """The same (at most ``train.eval_batches``) held-out micro-batches every time; None without
        data.eval_path. Ranks can hold different numbers (their shards differ)."""
        path = self.cfg.data.eval_path
        if not path:
            return None
        n = self.cfg.train.eval_batches
        if not hasattr(self, "_eval_cache"):
            mb = self.cfg.train.micro_batch_size
            if self.kind == "tokens":
                fmt = detect_format(path, self.cfg.data.format, "data.eval_path")
                loader = DataLoader(
                    self._text_dataset([(resolve_files(path, "data.eval_path"), fmt, 1.0)], False),
                    batch_size=None,
                )
            else:
                from distrain.data.vision import EpochSampler, collate

                ds = self._image_dataset(path, train=False)
                loader = DataLoader(
                    ds,
                    batch_size=mb,
                    sampler=EpochSampler(len(ds), self.rank, self.world, 0, False, loop=False),
                    collate_fn=collate,
                    drop_last=True,
                )
            batches = []
            for b in loader:
                batches.append(b)
                if len(batches) == n:
                    break
            self._eval_cache = batches  # may be short, or empty, on this rank: the trainer agrees a count
        return self._eval_cache


def _epochs(obj: Any) -> list[int]:
    """Every epoch counter in a saved data position (text cursors, image samplers, Ray streams)."""
    found: list[int] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("epoch"), int) and ("pos" in obj or "idx" in obj):
            found.append(obj["epoch"])
        for v in obj.values():
            found += _epochs(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += _epochs(v)
    return found


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
