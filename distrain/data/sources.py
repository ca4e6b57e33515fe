"""Where rows come from: local paths, globs and fsspec URLs (``s3://``, ``gs://``, ``hf://``,
``file://``, ``memory://`` ...), read row by row with the file and row named in every error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distrain.errors import DataError

_EXT = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".parquet": "parquet",
}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_GLOB = set("*?[")


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _full(fs, p: str, like: str) -> str:
    """Keep the URL scheme of the user's path on what a listing returns."""
    if "://" in like and "://" not in p:
        return fs.unstrip_protocol(p)
    return p


def resolve_files(path: str, key: str, exts: set[str] | None = None) -> list[str]:
    """Sorted files for a file, directory or glob (local or any fsspec URL)."""
    exts = exts if exts is not None else set(_EXT)
    fs, root = _fs(path)
    if any(c in path for c in _GLOB):
        found = [p for p in fs.glob(root) if fs.isfile(p)]
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if _suffix(p) in exts]
    elif fs.exists(root):
        found = [root]
    else:
        found = []
    files = sorted(_full(fs, p, path) for p in found)
    if not files:
        hint = (
            " (the shipped configs' data is written by `distrain data prepare`)"
            if path.startswith("data/")
            else ""
        )
        raise DataError(f"{key}: no data files at {path!r}{hint}")
    return files


def is_imagefolder(path: str) -> bool:
    fs, root = _fs(path)
    if any(c in path for c in _GLOB) or not fs.isdir(root):
        return False
    entries = fs.ls(root, detail=True)
    return any(e["type"] == "directory" for e in entries) and not any(
        e["type"] == "file" and _suffix(e["name"]) in _EXT for e in entries
    )


def detect_format(path: str, fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    if is_imagefolder(path):
        return "imagefolder"
    kinds = {_EXT.get(_suffix(f)) for f in resolve_files(path, key)}
    if len(kinds) != 1 or None in kinds:
        raise DataError(
            f"{key}: cannot infer the format of {path!r} (found {sorted(str(k) for k in kinds)}); set data.format"
        )
    return kinds.pop()


@dataclass
class Row:
    """One row read from ``file`` (0-based ``index``: the line of a jsonl file, the row of a parquet
    file); ``value`` is the parsed row or ``error`` says why it could not be read."""

    file: str
    index: int
    value: dict[str, Any] | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        return (
            f"{self.file} line {self.index + 1}"
            if self.file.endswith((".jsonl", ".json"))
            else f"{self.file} row {self.index}"
        )


def read_rows(file: str, fmt: str, start: int = 0, stop: int | None = None) -> Iterator[Row]:
    """Rows ``start`` (inclusive) to ``stop`` (exclusive) of one file, in file order."""
    fs, p = _fs(file)
    if fmt == "jsonl":
        with fs.open(p, "rb") as f:
            for i, raw in enumerate(f):
                if i < start:
                    continue
                if stop is not None and i >= stop:
                    return
                try:
                    value = json.loads(raw)
                except ValueError as exc:
                    yield Row(file, i, error=f"malformed JSON ({exc})")
                    continue
                if not isinstance(value, dict):
                    yield Row(file, i, error=f"a JSON {type(value).__name__}, not an object")
                    continue
                yield Row(file, i, value)
    elif fmt == "txt":
        if start == 0 and (stop is None or stop > 0):
            with fs.open(p, "rb") as f:
                data = f.read()
            try:
                yield Row(file, 0, {"text": data.decode("utf-8")})
            except UnicodeDecodeError as exc:
                yield Row(file, 0, error=f"not UTF-8 text ({exc})")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            base = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if base + n <= start:
                    base += n
                    continue
                if stop is not None and base >= stop:
                    return
                for j, value in enumerate(pf.read_row_group(g).to_pylist()):
                    i = base + j
                    if i < start:
                        continue
                    if stop is not None and i >= stop:
                        return
                    yield Row(file, i, value)
                base += n
    else:
        raise ValueError(f"data.format={fmt} has no row reader")
