"""Images: ImageFolder files, parquet rows or Hugging Face Arrow rows of encoded bytes, decoded with
PIL and transformed with torchvision.transforms.v2.

Each sample's augmentation is seeded by (run.seed, epoch, file, row), so a resumed run, any number of
DataLoader workers or Ray actors and any prefetch depth see the same crops and flips.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from distrain.data.plan import Doc, Prepared
from distrain.data.sources import arrow_table, open_file
from distrain.errors import DataError

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


class DecodeImages:
    """A row -> ``[(image tensor, label)]``, or why it is unusable. Seeds the CPU generator per
    sample: callers in the training process save and restore its state around a batch."""

    def __init__(self, cfg, train: bool, fmt: str):
        d = cfg.data
        self.transform = build_transform(cfg, train)
        self.mode = "RGB" if cfg.model.in_channels == 3 else "L"
        self.seed, self.fmt = cfg.run.seed, fmt
        self.image_field, self.label_field = d.image_field, d.label_field

    def _source(self, row) -> tuple[Any, int]:
        v = row.value
        if self.fmt == "imagefolder":
            return v["path"], int(v["label"])
        for col, k in ((self.image_field, "data.image_field"), (self.label_field, "data.label_field")):
            if col not in v:
                raise DataError(f"{k}: {row.file} has no column {col!r} (columns: {sorted(v)}); set {k}")
        raw = v[self.image_field]
        if isinstance(raw, dict):  # {'bytes': ..., 'path': ...}: parquet image structs, HF Image()
            raw = raw.get("bytes") or raw.get("path") or b""
        return raw, int(v[self.label_field])

    def __call__(self, row: Doc) -> Prepared:
        if row.error is not None:
            return Prepared(None, "malformed", row.error)
        src, label = self._source(row)
        try:
            fh = io.BytesIO(src) if isinstance(src, bytes | bytearray) else open_file(src)
            with fh, Image.open(fh) as im:
                img = im.convert(self.mode)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's
            return Prepared(None, "undecodable", f"cannot decode the image ({exc})")
        # this sample's augmentation; the CPU generator only (torch.manual_seed also queues CUDA seeding)
        key = hash((self.seed, row.epoch, row.file_id, row.index)) & 0x7FFF_FFFF_FFFF_FFFF
        torch.default_generator.manual_seed(key)
        return Prepared([(self.transform(img), label)])


def collate_images(samples) -> dict[str, torch.Tensor]:
    return {
        "images": torch.stack([s.data[0] for s in samples]),
        "labels": torch.tensor([s.data[1] for s in samples], dtype=torch.long),
        "data_errors": torch.from_numpy(np.sum([s.errors for s in samples], axis=0)),
    }


def max_label(manifest, field: str) -> int:
    """The largest class index of a parquet or Arrow image source, read from its label column only."""
    import pyarrow.compute as pc

    top = -1
    for f in manifest.files:
        if manifest.fmt == "hf":
            table = arrow_table(f.path)
            cols = table.column_names
            columns = [table.column(field)] if field in cols else []
        else:
            import pyarrow.parquet as pq

            with open_file(f.path) as fh:
                pf = pq.ParquetFile(fh)
                cols = pf.schema_arrow.names
                columns = [b.column(0) for b in pf.iter_batches(columns=[field])] if field in cols else []
        if field not in cols:
            raise DataError(
                f"data.label_field: {f.path} has no column {field!r} (columns: {sorted(cols)}); set data.label_field"
            )
        for col in columns:
            if len(col):
                top = max(top, int(pc.max(col).as_py()))
    return top
