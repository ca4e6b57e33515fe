"""Images: ImageFolder files, parquet rows or Hugging Face Arrow rows of encoded bytes, decoded with
PIL; a sample leaves the worker as a uint8 tensor at the model's size, and a batch is scaled and
normalised at once when it is collated.

Training augmentation is torchvision's random resized crop (and horizontal flip) on the PIL image:
the crop box drawn by torchvision's algorithm from a ``random.Random`` seeded by (run.seed, epoch,
file, row), then PIL's crop and bilinear resize, as torchvision does for a PIL image. A resumed run,
any number of DataLoader workers or Ray actors and any prefetch depth therefore see the same crops
and flips, and decoding draws nothing from torch's generators. Eval (and training with
``data.augment: false``) resizes and center-crops with torchvision.transforms.v2.
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from distrain.data.plan import Doc, Prepared
from distrain.data.sources import arrow_table, open_file
from distrain.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def norm_stats(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: data.mean / data.std, else ImageNet's for RGB and 0.5 for greyscale."""
    d = cfg.data
    default_mean, default_std = (
        (IMAGENET_MEAN, IMAGENET_STD) if cfg.model.in_channels == 3 else ((0.5,), (0.5,))
    )
    return tuple(d.mean or default_mean), tuple(d.std or default_std)


def crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random, ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random resized crop: torchvision's ``RandomResizedCrop``
    sampling (an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, ten tries,
    then the central crop), drawn from ``rng``."""
    area, log_ratio = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class DecodeImages:
    """A row -> ``[(uint8 image tensor, label)]`` at the model's size, or why it is unusable."""

    def __init__(self, cfg, train: bool, fmt: str):
        from torchvision.transforms import v2

        d, m = cfg.data, cfg.model
        self.size, self.augment = m.image_size, train and d.augment
        self.scale, self.hflip = tuple(d.crop_scale), d.hflip
        self.resize = v2.Compose(
            [
                v2.Resize(round(m.image_size * d.eval_resize_ratio), antialias=True),
                v2.CenterCrop(m.image_size),
            ]
        )
        self.to_tensor = v2.functional.pil_to_tensor
        self.mode = "RGB" if m.in_channels == 3 else "L"
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
        if not self.augment:
            return Prepared([(self.resize(self.to_tensor(img)), label)])
        rng = random.Random(hash((self.seed, row.epoch, row.file_id, row.index)))
        left, top, w, h = crop_box(img.width, img.height, self.scale, rng)
        img = img.crop((left, top, left + w, top + h)).resize(
            (self.size, self.size), Image.Resampling.BILINEAR
        )
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return Prepared([(self.to_tensor(img), label)])


class CollateImages:
    """Samples -> a batch: the uint8 images stacked, scaled to [0, 1] and normalised per channel."""

    def __init__(self, cfg):
        self.mean, self.std = (list(x) for x in norm_stats(cfg))

    def __call__(self, samples) -> dict[str, torch.Tensor]:
        from torchvision.transforms.v2 import functional as F

        images = F.to_dtype(torch.stack([s.data[0] for s in samples]), torch.float32, scale=True)
        return {
            "images": F.normalize(images, self.mean, self.std),
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
