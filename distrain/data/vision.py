"""Images: an ImageFolder-style directory or parquet rows of encoded bytes, decoded with PIL and
transformed with torchvision.transforms.v2."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from distrain.data.sources import IMAGE_EXT, resolve_files

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_transform(image_size: int, channels: int, train: bool, augment: bool, hflip: bool):
    from torchvision.transforms import v2

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    if train and augment:
        ops = [v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class ImageFolderDataset(Dataset):
    """root/<class>/<image>: classes are the sorted sub-directory names."""

    def __init__(self, root: str, transform, channels: int, key: str):
        rootp = Path(root)
        self.classes = sorted(d.name for d in rootp.iterdir() if d.is_dir())
        self.samples = [
            (str(f), ci)
            for ci, c in enumerate(self.classes)
            for f in sorted((rootp / c).rglob("*"))
            if f.suffix.lower() in IMAGE_EXT
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"{key}: no images ({', '.join(sorted(IMAGE_EXT))}) under {root}/<class>/"
            )
        self.transform, self.mode = transform, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except Exception as exc:  # noqa: BLE001 - name the file that failed
            raise ValueError(f"cannot decode image {path}: {exc}") from None
        return self.transform(img), label


class ParquetImageDataset(Dataset):
    """Parquet rows with an encoded image (bytes or a {'bytes': ...} struct) and an integer label."""

    def __init__(self, path: str, image_field: str, label_field: str, transform, channels: int, key: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.files = resolve_files(path, key)
        tables = []
        for f in self.files:
            t = pq.read_table(f)
            for col, k in ((image_field, "data.image_field"), (label_field, "data.label_field")):
                if col not in t.column_names:
                    raise KeyError(f"{k}: {f} has no column {col!r} (columns: {t.column_names}); set {k}")
            tables.append(t.select([image_field, label_field]))
        table = pa.concat_tables(tables)
        self.images = table.column(image_field).to_pylist()
        self.labels = [int(x) for x in table.column(label_field).to_pylist()]
        self.classes = sorted(set(self.labels))
        self.transform, self.mode = transform, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        raw = self.images[i]
        data = raw.get("bytes") if isinstance(raw, dict) else raw
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert(self.mode)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot decode the image in row {i} of {self.files}: {exc}") from None
        return self.transform(img), self.labels[i]


def collate(samples) -> dict[str, torch.Tensor]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return {"images": images, "labels": labels}
