"""Resolving ``data.train_path`` / ``data.eval_path`` into files and a format."""

from __future__ import annotations

import glob
from pathlib import Path

_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt", ".parquet": "parquet"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def resolve_files(path: str, key: str) -> list[str]:
    """Sorted files for a file, directory or glob; a clear error when nothing is there."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _EXT)
    else:
        files = sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file())
    if not files:
        hint = " (the shipped configs' data is written by `distrain data prepare`)" if path.startswith("data/") else ""
        raise FileNotFoundError(f"{key}: no data files at {path!r}{hint}")
    return files


def is_imagefolder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(c.is_dir() for c in p.iterdir()) and not any(f.suffix in _EXT for f in p.iterdir() if f.is_file())


def detect_format(path: str, fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    if is_imagefolder(path):
        return "imagefolder"
    files = resolve_files(path, key)
    kinds = {_EXT.get(Path(f).suffix) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"{key}: cannot infer the format of {path!r} (found {sorted(str(k) for k in kinds)}); set data.format")
    return kinds.pop()
