"""Where rows come from: local paths, globs and fsspec URLs (``s3://``, ``gs://``, ``hf://``,
``file://``, ``memory://`` ...), ImageFolder directories and Hugging Face ``datasets`` Arrow files;
each source's manifest (files, row counts, seek points; cached); rows read front to back with the
file and row named in every error."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from distrain.errors import DataError

log = logging.getLogger(__name__)

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


def open_file(path: str):
    """A binary file object: the built-in ``open`` for a local path (C-level reads), fsspec's otherwise."""
    if "://" not in path:
        return open(path, "rb")
    fs, p = _fs(path)
    return fs.open(p, "rb")


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


def is_hf_dataset(path: str) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    if "://" in path or any(c in path for c in _GLOB):
        return False
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def detect_format(path: str, fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    if is_hf_dataset(path):
        return "hf"
    if is_imagefolder(path):
        return "imagefolder"
    kinds = {_EXT.get(_suffix(f)) for f in resolve_files(path, key)}
    if len(kinds) != 1 or None in kinds:
        raise DataError(
            f"{key}: cannot infer the format of {path!r} (found {sorted(str(k) for k in kinds)}); set data.format"
        )
    return kinds.pop()


def row_where(file: str, index: int) -> str:
    """How an error names a row: the line of a jsonl file, an image file, the row of any other."""
    if file.endswith((".jsonl", ".json")):
        return f"{file} line {index + 1}"
    if file.rsplit(".", 1)[-1].lower() in {e[1:] for e in IMAGE_EXT}:
        return file
    return f"{file} row {index}"


class Row(NamedTuple):
    """One row read from ``file`` (0-based ``index``: the line of a jsonl file, the row of a parquet
    file or Arrow table, the image of an ImageFolder); ``value`` is the parsed row or ``error`` says
    why it could not be read. ``file_id`` is the file's place in the source's manifest."""

    file: str
    index: int
    value: dict[str, Any] | None = None
    error: str | None = None
    file_id: int = 0

    @property
    def where(self) -> str:
        return row_where(self.file, self.index)


class Rows:
    """Rows as a reader hands them out, a column each: ``fids`` (each row's file, by its place in
    the manifest), ``indexes`` (the row's index in its file), ``values`` (the parsed rows, None where
    a row could not be read) and ``errors`` (why; None when every row was read). Indexing or
    iterating gives ``Row``s."""

    __slots__ = ("manifest", "fids", "indexes", "values", "errors")

    def __init__(self, manifest: Manifest, fids: list[int], indexes: list[int], values: list, errors=None):
        self.manifest, self.fids, self.indexes = manifest, fids, indexes
        self.values, self.errors = values, errors

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, j: int) -> Row:
        f = self.fids[j]
        error = self.errors[j] if self.errors else None
        return Row(self.manifest.paths[f], self.indexes[j], self.values[j], error, f)

    def __iter__(self) -> Iterator[Row]:
        return map(self.__getitem__, range(len(self.values)))


# --------------------------------------------------------------------------------------- manifests
MANIFEST_VERSION = 2
# The unit a partition boundary falls on (a chunk): a row of a small file, 1024 lines of a large
# jsonl file (the manifest keeps the byte offset of each), a row group of a large parquet file.
SMALL_FILE_ROWS = 65536
JSONL_STRIDE = 1024


def cache_dir() -> Path:
    """Where file manifests are cached: $DISTRAIN_CACHE_DIR, else ~/.cache/distrain/manifests."""
    env = os.environ.get("DISTRAIN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "distrain" / "manifests"


@dataclass
class FileInfo:
    """What a manifest knows of one file: where it is, its size and mtime (the cache key), its row
    count and how to seek into it (parquet: rows per row group; jsonl: the byte offset of every
    ``stride``-th line). Its chunks are ``stride`` rows each, or its row groups when ``stride`` is
    None. ``label`` is an ImageFolder image's class index."""

    path: str
    size: int
    rows: int
    mtime: float | None = None
    groups: list[int] | None = None
    offsets: list[int] | None = None
    label: int | None = None
    stride: int | None = 1

    def chunk_starts(self) -> np.ndarray:
        if self.stride is None:
            return np.concatenate([[0], np.cumsum(self.groups)[:-1]]).astype(np.int64)
        return np.arange(0, self.rows, self.stride, dtype=np.int64)

    @property
    def n_chunks(self) -> int:
        if self.stride is None:
            return len(self.groups)
        return -(-self.rows // self.stride)


class Manifest:
    """One source's files in a fixed order with their row counts; ``digest`` names the corpus
    (relative paths, sizes and row counts), so a resume can tell that the data changed."""

    def __init__(self, key: str, fmt: str, files: list[FileInfo], classes: list[str] | None = None):
        self.key, self.fmt, self.files, self.classes = key, fmt, files, classes
        self.paths = [f.path for f in files]
        self.rows = np.array([f.rows for f in files], dtype=np.int64)
        self.chunks = np.array([f.n_chunks for f in files], dtype=np.int64)
        self.total = int(self.rows.sum())
        prefix = os.path.commonpath([f.path for f in files]) if len(files) > 1 else ""
        if prefix and not all(f.path.startswith(prefix) for f in files):
            prefix = ""
        cut = len(prefix.rstrip("/") + "/") if prefix else 0
        self.names = [f.path[cut:] if cut else f.path.rsplit("/", 1)[-1] for f in files]
        h = hashlib.sha256(f"{fmt}\n".encode())
        for name, f in zip(self.names, files, strict=True):
            h.update(f"{name}\t{f.size}\t{f.rows}\n".encode())
        self.digest = h.hexdigest()[:32]

    def summary(self) -> dict[str, Any]:
        """What a checkpoint keeps to name a changed file on resume."""
        return {
            "key": self.key,
            "format": self.fmt,
            "digest": self.digest,
            "files": [[n, f.size, f.rows] for n, f in zip(self.names, self.files, strict=True)],
        }

    def check_same(self, saved: dict[str, Any]) -> None:
        """Refuse to continue a run whose corpus is not the one its position was saved for."""
        if saved["digest"] == self.digest:
            return
        was = {n: (size, rows) for n, size, rows in saved["files"]}
        now = {n: (f.size, f.rows) for n, f in zip(self.names, self.files, strict=True)}
        fix = f"resume with the corpus the run was started on, or start a new run (another run.dir) on this one ({self.key})"
        for n, f in zip(self.names, self.files, strict=True):
            if n not in was:
                raise DataError(f"{self.key}: {f.path} is new since the checkpoint; {fix}")
            if was[n] != now[n]:
                raise DataError(
                    f"{self.key}: {f.path} changed since the checkpoint ({was[n][1]} rows, {was[n][0]} bytes -> "
                    f"{f.rows} rows, {f.size} bytes); {fix}"
                )
        gone = [n for n in was if n not in now]
        if gone:
            raise DataError(f"{self.key}: {gone[0]} is gone since the checkpoint; {fix}")
        if saved["format"] != self.fmt:
            raise DataError(
                f"{self.key}: read as {self.fmt}, the checkpoint's data was {saved['format']}; {fix}"
            )
        raise DataError(f"{self.key}: the file order changed since the checkpoint; {fix}")


def _stat(fs, p: str) -> tuple[int, float | None]:
    info = fs.info(p)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return int(info.get("size") or 0), (float(mtime) if mtime is not None else None)


def _count_jsonl(fs, p: str) -> tuple[int, list[int], int]:
    """Lines of a jsonl file (a last line without a newline counts), the byte offset of every
    ``stride``-th line and the stride (1 for a small file, JSONL_STRIDE for a large one), in one
    front-to-back read."""
    offsets, rows, pos, last, stride = [0], 0, 0, b"\n", 1
    with fs.open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            start = 0
            while (i := chunk.find(b"\n", start)) != -1:
                rows += 1
                if rows % stride == 0:
                    offsets.append(pos + i + 1)  # where line ``rows`` starts
                    if stride == 1 and rows == SMALL_FILE_ROWS:  # a large file: keep every 1024th
                        offsets, stride = offsets[::JSONL_STRIDE], JSONL_STRIDE
                start = i + 1
            pos += len(chunk)
            last = chunk[-1:]
    if pos and last != b"\n":
        rows += 1  # a last line without a newline
    return rows, offsets[: max(1, -(-rows // stride))], stride


def _index_file(fs, p: str, full: str, fmt: str) -> FileInfo:
    size, mtime = _stat(fs, p)
    cache = cache_dir() / f"{hashlib.sha256(f'{fmt}:{full}'.encode()).hexdigest()[:40]}.json"
    try:
        c = json.loads(cache.read_text())
        if (
            c["version"] == MANIFEST_VERSION
            and c["size"] == size
            and c["mtime"] == mtime
            and mtime is not None
        ):
            return FileInfo(
                full, size, c["rows"], mtime, c.get("groups"), c.get("offsets"), stride=c["stride"]
            )
    except (OSError, ValueError, KeyError):
        pass
    groups = offsets = None
    stride: int | None = 1
    if fmt == "jsonl":
        rows, offsets, stride = _count_jsonl(fs, p)
    elif fmt == "txt":
        rows = 1
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        rows = sum(groups)
        stride = 1 if rows <= SMALL_FILE_ROWS or not groups else None
    elif fmt == "hf":
        rows = arrow_table(full).num_rows
    else:
        raise ValueError(f"data.format={fmt} has no file index")
    info = FileInfo(full, size, rows, mtime, groups, offsets, stride=stride)
    if mtime is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "version": MANIFEST_VERSION,
                        "path": full,
                        "size": size,
                        "mtime": mtime,
                        "rows": rows,
                        "groups": groups,
                        "offsets": offsets,
                        "stride": stride,
                    }
                )
            )
            os.replace(tmp, cache)
        except OSError as exc:  # a read-only home: index again next time
            log.debug("manifest cache not written (%s)", exc)
    return info


def _hf_files(path: str, key: str, split: str) -> list[str]:
    """The Arrow files behind a ``save_to_disk`` directory (a DatasetDict's ``split``) or a dataset
    in the local Hugging Face cache (``load_dataset(path, split=split)``; offline when
    HF_DATASETS_OFFLINE=1)."""
    import datasets

    p = Path(path)
    try:
        if (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
            if split not in splits:
                raise DataError(
                    f"{key}: {path} has splits {splits}, not {split!r}; set data.split / data.eval_split"
                )
            ds = datasets.load_from_disk(str(p / split))
        elif (p / "state.json").is_file():
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=split, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; name the key and the cause
        raise DataError(
            f"{key}: cannot open {path!r} as a Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    if ds._indices is not None:
        raise DataError(f"{key}: {path} has an indices mapping; save it with flatten_indices() first")
    return [f["filename"] for f in ds.cache_files]


def build_manifest(path: str, fmt: str, key: str, split: str = "train") -> Manifest:
    """The manifest of one source: every file (or ImageFolder image) in sorted order, with its row
    count; file indexes are cached by path, size and mtime (``cache_dir()``)."""
    if fmt == "imagefolder":
        return _imagefolder_manifest(path, key)
    files = _hf_files(path, key, split) if fmt == "hf" else resolve_files(path, key)
    out = []
    for full in files:
        fs, p = _fs(full)
        out.append(_index_file(fs, p, full, fmt))
    return Manifest(key, fmt, out)


def _imagefolder_manifest(root: str, key: str) -> Manifest:
    """root/<class>/<image>: classes are the sorted sub-directory names, images sorted within."""
    fs, r = _fs(root)
    if not fs.isdir(r):
        raise DataError(f"{key}: no directory at {root!r}")
    classes = sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(r, detail=True) if e["type"] == "directory"
    )
    files = []
    for ci, c in enumerate(classes):
        found = fs.find(f"{r.rstrip('/')}/{c}", detail=True)
        for name in sorted(found):
            if _suffix(name) in IMAGE_EXT:
                full = fs.unstrip_protocol(name) if "://" in root else name
                files.append(FileInfo(full, int(found[name].get("size") or 0), 1, label=ci))
    if not files:
        raise DataError(f"{key}: no images ({', '.join(sorted(IMAGE_EXT))}) under {root}/<class>/")
    return Manifest(key, "imagefolder", files, classes)


# ----------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=64)
def arrow_table(path: str):
    """A Hugging Face Arrow file as a memory-mapped table (``datasets``' own reader)."""
    import datasets

    return datasets.Dataset.from_file(path, in_memory=False).data.table


def _jsonl_rows(info, start: int, stop: int, batch: int) -> Iterator[list[bytes]]:
    """Lines ``start:stop`` of a jsonl file, seeking to the indexed offset before ``start``."""
    k = start // info.stride
    with open_file(info.path) as f:
        f.seek(info.offsets[k])
        for _ in range(start - k * info.stride):  # fewer than one stride of lines, on a resume
            f.readline()
        left = stop - start
        while left:
            lines = list(itertools.islice(f, min(left, batch)))
            if lines:
                yield lines
            if len(lines) < min(left, batch):  # shorter than its manifest: reported above
                return
            left -= len(lines)


def _parquet_rows(info, start: int, stop: int, columns: list[str] | None, batch: int) -> Iterator[Any]:
    """Record batches of rows ``start:stop`` of a parquet file, reading only the row groups that
    hold them."""
    import pyarrow.parquet as pq

    groups = info.groups or []
    ends = np.cumsum(groups)
    g = int(np.searchsorted(ends, start, side="right"))  # the group holding row ``start``
    last = int(np.searchsorted(ends, stop - 1, side="right"))
    if g >= len(groups):
        return
    local = "://" not in info.path  # a local path: pyarrow's own (native) file reads
    with contextlib.nullcontext(info.path) if local else open_file(info.path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 16)
        names = pf.schema_arrow.names
        cols = columns if columns and all(c in names for c in columns) else None
        index = int(ends[g - 1]) if g else 0
        for got in pf.iter_batches(
            batch_size=batch, row_groups=range(g, last + 1), columns=cols, use_threads=False
        ):
            lo, hi = max(0, start - index), min(got.num_rows, stop - index)
            if hi > lo:
                yield got.slice(lo, hi - lo) if (lo or hi < got.num_rows) else got
            index += got.num_rows
            if index >= stop:
                return


def _arrow_rows(info, start: int, stop: int, columns: list[str] | None, batch: int) -> Iterator[Any]:
    """Record batches of rows ``start:stop`` of a saved HF dataset's Arrow table."""
    table = arrow_table(info.path)
    cols = columns if columns and all(c in table.column_names for c in columns) else None
    if cols:
        table = table.select(cols)
    yield from table.slice(start, stop - start).to_batches(max_chunksize=batch)


def iter_raw(
    manifest: Manifest,
    i: int,
    start: int = 0,
    columns: list[str] | None = None,
    stop: int | None = None,
    batch: int = 1024,
) -> Iterator[Any]:
    """The raw rows of file ``i`` of ``manifest`` from row ``start`` (to ``stop``, or the end),
    front to back, in runs of consecutive rows: lists of jsonl lines (bytes), seeking to the indexed
    offset before ``start``; for parquet and Arrow, record batches of ``columns`` (of every column
    when the file lacks one of them), reading only the row groups that hold the rows. ``make_rows``
    parses them. A run holds at most ``batch`` rows."""
    info, fmt = manifest.files[i], manifest.fmt
    stop = info.rows if stop is None else min(stop, info.rows)
    if start >= stop:
        return
    if fmt == "imagefolder":
        yield [None]
        return
    if fmt == "txt":
        with open_file(info.path) as f:
            yield [f.read()]
        return
    if fmt == "jsonl":
        yield from _jsonl_rows(info, start, stop, batch)
        return
    if fmt == "parquet":
        yield from _parquet_rows(info, start, stop, columns, batch)
        return
    if fmt == "hf":
        yield from _arrow_rows(info, start, stop, columns, batch)
        return
    raise ValueError(f"data.format={fmt} has no row reader")


def row_bytes(manifest: Manifest) -> float:
    """About how many bytes a raw row of ``manifest`` takes in memory: its files' bytes per row, or
    for parquet and Arrow the decoded size of the first file's first rows (compressed or
    dictionary-encoded columns are larger in memory than on disk); 0 for an ImageFolder, whose rows
    are only paths until decoded."""
    if manifest.fmt == "imagefolder" or not manifest.total:
        return 0.0
    on_disk = sum(f.size for f in manifest.files) / manifest.total
    first = next((i for i, f in enumerate(manifest.files) if f.rows), None)
    if manifest.fmt not in ("parquet", "hf") or first is None:
        return on_disk
    batch = next(iter_raw(manifest, first, 0, None, None, 64))
    return max(on_disk, batch.nbytes / batch.num_rows)


_JSON = json.JSONDecoder()


def _json_line(raw: bytes) -> Any:
    """One jsonl line parsed: ``json.loads`` without its per-call encoding detection (jsonl is UTF-8)."""
    if raw[:1] != b"{":  # leading space, a byte-order mark, not an object: the full parser
        return json.loads(raw)
    text = raw.decode("utf-8")
    value, end = _JSON.raw_decode(text)
    if end < len(text) and not text[end:].isspace():
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def make_rows(manifest: Manifest, fids: list[int], indexes: list[int], raws: list[Any]) -> Rows:
    """Rows ``indexes`` of files ``fids`` of ``manifest``, parsed from what ``iter_raw`` gave for
    them (parquet and Arrow rows already as dicts: a record batch's ``to_pylist()``)."""
    fmt, files = manifest.fmt, manifest.files
    if fmt in ("parquet", "hf"):
        return Rows(manifest, fids, indexes, raws)
    if fmt == "imagefolder":
        return Rows(manifest, fids, indexes, [{"path": files[f].path, "label": files[f].label} for f in fids])
    values, errors = [], None
    for j, raw in enumerate(raws):
        value = error = None
        if fmt == "jsonl":
            try:
                value = _json_line(raw)
            except ValueError as exc:  # UnicodeDecodeError included
                error = f"malformed JSON ({exc})"
            else:
                if type(value) is not dict:
                    value, error = None, f"a JSON {type(value).__name__}, not an object"
        else:
            try:
                value = {"text": raw.decode("utf-8")}
            except UnicodeDecodeError as exc:
                error = f"not UTF-8 text ({exc})"
        values.append(value)
        if error is not None:
            errors = errors or [None] * len(raws)
            errors[j] = error
    return Rows(manifest, fids, indexes, values, errors)
