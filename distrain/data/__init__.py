"""Data pipelines: per-rank sharded, decoded off the training thread when ``data.num_workers`` > 0."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from distrain.config import Config
from distrain.data.sources import detect_format, resolve_files
from distrain.data.tokenizer import load_tokenizer
from distrain.models import get_spec

log = logging.getLogger(__name__)


class DataPipeline:
    """Builds the train stream and eval batches for one rank of ``world``."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.cfg, self.rank, self.world, self.pin = cfg, rank, world, pin_memory
        self.kind = get_spec(cfg.model.name).batch_kind
        d = cfg.data
        self.format = detect_format(d.train_path, d.format, "data.train_path")
        if self.kind == "tokens":
            if self.format == "imagefolder":
                raise ValueError(
                    f"data.train_path {d.train_path} is an image folder but model.name={cfg.model.name} trains on text"
                )
            self.tokenizer = load_tokenizer(d.tokenizer)
            if self.tokenizer.vocab_size > cfg.model.vocab_size:
                raise ValueError(
                    f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of data.tokenizer="
                    f"{d.tokenizer} ({self.tokenizer.vocab_size}); set model.vocab_size >= {self.tokenizer.vocab_size}"
                )
            self.tokens_per_sample: int | None = d.seq_len
        else:
            if self.format not in ("imagefolder", "parquet"):
                raise ValueError(
                    f"data.format={self.format} holds no images; model.name={cfg.model.name} needs imagefolder or parquet"
                )
            self.tokenizer = None
            self.tokens_per_sample = None

    # ------------------------------------------------------------------ text
    def _text_loader(self, path: str, train: bool) -> DataLoader:
        from distrain.data.text import PackedText

        d = self.cfg.data
        key = "data.train_path" if train else "data.eval_path"
        fmt = detect_format(path, d.format, key)
        ds = PackedText(
            resolve_files(path, key),
            fmt,
            self.tokenizer,
            d.seq_len,
            d.text_field,
            self.rank,
            self.world,
            seed=self.cfg.run.seed,
            shuffle=d.shuffle and train,
            loop=train,
        )
        return DataLoader(
            ds,
            batch_size=self.cfg.train.micro_batch_size,
            num_workers=d.num_workers if train else 0,
            pin_memory=self.pin,
            persistent_workers=False,
            drop_last=True,
        )

    # ---------------------------------------------------------------- images
    def _image_dataset(self, path: str, train: bool):
        from distrain.data.vision import ImageFolderDataset, ParquetImageDataset, build_transform

        d, m = self.cfg.data, self.cfg.model
        key = "data.train_path" if train else "data.eval_path"
        tf = build_transform(m.image_size, m.in_channels, train, d.augment, d.hflip)
        fmt = detect_format(path, d.format, key)
        if fmt == "imagefolder":
            ds = ImageFolderDataset(path, tf, m.in_channels, key)
        else:
            ds = ParquetImageDataset(path, d.image_field, d.label_field, tf, m.in_channels, key)
        top = len(ds.classes) if fmt == "imagefolder" else max(ds.classes) + 1
        if top > m.num_classes:
            raise ValueError(
                f"{key}: {path} has {top} classes but model.num_classes={m.num_classes}; set model.num_classes >= {top}"
            )
        if len(ds) < self.cfg.train.micro_batch_size * self.world:
            raise ValueError(
                f"{key}: {path} has {len(ds)} images, fewer than train.micro_batch_size x world size = {self.cfg.train.micro_batch_size * self.world}"
            )
        return ds

    def _image_loader(self, ds, train: bool, epoch: int) -> DataLoader:
        from distrain.data.vision import collate

        sampler = DistributedSampler(
            ds,
            num_replicas=self.world,
            rank=self.rank,
            shuffle=self.cfg.data.shuffle and train,
            seed=self.cfg.run.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return DataLoader(
            ds,
            batch_size=self.cfg.train.micro_batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.cfg.data.num_workers if train else 0,
            pin_memory=self.pin,
            drop_last=True,
        )

    # ---------------------------------------------------------------- public
    def train_batches(self) -> Iterator[dict[str, Any]]:
        """Endless stream of training micro-batches for this rank."""
        path = self.cfg.data.train_path
        if self.kind == "tokens":
            yield from self._text_loader(path, train=True)
            return
        ds = self._image_dataset(path, train=True)
        epoch = 0
        while True:
            yield from self._image_loader(ds, True, epoch)
            epoch += 1

    def eval_batches(self) -> list[dict[str, Any]] | None:
        """The same ``train.eval_batches`` held-out micro-batches every time; None without data.eval_path."""
        path = self.cfg.data.eval_path
        if not path:
            return None
        n = self.cfg.train.eval_batches
        if not hasattr(self, "_eval_cache"):
            if self.kind == "tokens":
                loader = self._text_loader(path, train=False)
            else:
                loader = self._image_loader(self._image_dataset(path, train=False), False, 0)
            batches = []
            for b in loader:
                batches.append(b)
                if len(batches) == n:
                    break
            if not batches:
                raise ValueError(
                    f"data.eval_path: {path} gives no full micro-batch of train.micro_batch_size={self.cfg.train.micro_batch_size} on rank {self.rank}"
                )
            self._eval_cache = batches
        return self._eval_cache


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out
