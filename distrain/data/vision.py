"""Images: an ImageFolder-style directory or parquet rows of encoded bytes (local or fsspec),
decoded with PIL and transformed with torchvision.transforms.v2.

Each sample's augmentation is seeded by (run.seed, epoch, index), so a resumed run, any number of
DataLoader workers and any prefetch depth see the same crops and flips.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from distrain.data.sources import IMAGE_EXT, DataError, _fs, read_rows, resolve_files
from distrain.data.text import ERROR_KINDS

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_transform(cfg, train: bool):
    """Train: random resized crop (+ flip); eval: resize by eval_resize_ratio + center crop."""
    from torchvision.transforms import v2

    d, m = cfg.data, cfg.model
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if m.in_channels == 3 else ((0.5,), (0.5,))
    mean, std = tuple(d.mean or default_mean), tuple(d.std or default_std)
    if train and d.augment:
        ops = [v2.RandomResizedCrop(m.image_size, scale=tuple(d.crop_scale), antialias=True)]
        if d.hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops = [
            v2.Resize(round(m.image_size * d.eval_resize_ratio), antialias=True),
            v2.CenterCrop(m.image_size),
        ]
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class _Images(Dataset):
    """Map-style; keys are (index, epoch). A sample that cannot be decoded is replaced by the next
    index (counted) with data.on_error=skip, so every batch keeps its size."""

    def __init__(self, transform, channels: int, seed: int, on_error: str):
        self.transform, self.mode = transform, "RGB" if channels == 3 else "L"
        self.seed, self.on_error = seed, on_error

    def _load(self, i: int) -> tuple[bytes | str, int, str]:
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int] | int):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int] | int]) -> list:
        """Decode and transform a batch of samples; the global RNG is saved once around the batch."""
        state = torch.random.get_rng_state()
        try:
            return [self._sample(*(key if isinstance(key, tuple) else (key, 0))) for key in keys]
        finally:
            torch.random.set_rng_state(state)

    def _sample(self, index: int, epoch: int):
        errors = np.zeros(len(ERROR_KINDS), dtype=np.int64)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            src, label, where = self._load(i)
            try:
                fh = io.BytesIO(src) if isinstance(src, bytes | bytearray) else _open(src)
                with fh, Image.open(fh) as im:
                    img = im.convert(self.mode)
                break
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's
                if self.on_error == "fail":
                    raise DataError(
                        f"{where}: cannot decode the image ({exc}); fix or remove it, or set data.on_error=skip"
                    ) from None
                errors[ERROR_KINDS.index("undecodable")] += 1
                log.warning("skipping %s: cannot decode the image (%s) (data.on_error=skip)", where, exc)
        else:
            raise DataError(f"no image in {self.describe()} can be decoded")
        # this sample's augmentation; the CPU generator only (torch.manual_seed also queues CUDA seeding)
        torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        return self.transform(img), label, errors

    def describe(self) -> str:
        raise NotImplementedError


def _open(path: str):
    if "://" not in path:
        return open(path, "rb")
    fs, p = _fs(path)
    return fs.open(p, "rb")


class ImageFolderDataset(_Images):
    """root/<class>/<image>: classes are the sorted sub-directory names."""

    def __init__(self, root: str, transform, channels: int, key: str, seed: int = 0, on_error: str = "skip"):
        super().__init__(transform, channels, seed, on_error)
        fs, r = _fs(root)
        self.root = root
        self.classes = sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in fs.ls(r, detail=True)
            if e["type"] == "directory"
        )
        self.samples: list[tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            for f in sorted(fs.find(f"{r.rstrip('/')}/{c}")):
                if "." + f.rsplit(".", 1)[-1].lower() in IMAGE_EXT:
                    self.samples.append((fs.unstrip_protocol(f) if "://" in root else f, ci))
        if not self.samples:
            raise DataError(f"{key}: no images ({', '.join(sorted(IMAGE_EXT))}) under {root}/<class>/")

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int):
        path, label = self.samples[i]
        return path, label, path

    def describe(self) -> str:
        return self.root


class ParquetImageDataset(_Images):
    """Parquet rows with an encoded image (bytes or a {'bytes': ...} struct) and an integer label."""

    def __init__(
        self,
        path: str,
        image_field: str,
        label_field: str,
        transform,
        channels: int,
        key: str,
        seed: int = 0,
        on_error: str = "skip",
    ):
        super().__init__(transform, channels, seed, on_error)
        self.path = path
        self.rows: list[tuple[Any, int, str]] = []
        for f in resolve_files(path, key):
            for row in read_rows(f, "parquet"):
                for col, k in ((image_field, "data.image_field"), (label_field, "data.label_field")):
                    if col not in row.value:
                        raise DataError(
                            f"{k}: {f} has no column {col!r} (columns: {sorted(row.value)}); set {k}"
                        )
                raw = row.value[image_field]
                data = raw.get("bytes") if isinstance(raw, dict) else raw
                self.rows.append((data, int(row.value[label_field]), row.where))
        if not self.rows:
            raise DataError(f"{key}: no rows in {path}")
        self.classes = sorted({lab for _, lab, _ in self.rows})

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, i: int):
        data, label, where = self.rows[i]
        return (data if isinstance(data, bytes | bytearray) else b""), label, where

    def describe(self) -> str:
        return self.path


class EpochSampler(Sampler):
    """Endless (or one-epoch) keys (index, epoch) for one rank: each epoch a permutation seeded by
    (seed, epoch), cut to a multiple of the world size, every rank taking its stride. Saves its
    position with state_dict()."""

    def __init__(
        self, n: int, rank: int, world: int, seed: int, shuffle: bool, loop: bool = True, start_epoch: int = 0
    ):
        self.n, self.rank, self.world, self.seed, self.shuffle, self.loop = (
            n,
            rank,
            world,
            seed,
            shuffle,
            loop,
        )
        self.per_rank = n // world
        self.epoch, self.pos = start_epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[: self.per_rank * self.world][self.rank :: self.world]

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            order = self._order(self.epoch)
            while self.pos < len(order):
                i = order[self.pos]
                self.pos += 1
                yield (i, self.epoch)
            if not self.loop:
                return
            self.epoch, self.pos = self.epoch + 1, 0


def collate(samples) -> dict[str, torch.Tensor]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    errors = torch.from_numpy(np.sum([s[2] for s in samples], axis=0))
    return {"images": images, "labels": labels, "data_errors": errors}
