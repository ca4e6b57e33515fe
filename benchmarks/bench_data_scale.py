"""The data plan at corpus scale: manifest build time, a pass's rate over its first and last 10%
against a plain read of the same files, bytes read per rank at 1, 2 and 4 ranks, and the peak RSS of
a rank streaming 10k to 1M parquet images at 64 and at 8 partitions.

    python benchmarks/bench_data_scale.py [--rows 3200000] [--row-bytes 400] [--images 10000,100000,300000,1000000]
        [--repeat 3] [--instructions]   (--rows 0: the images only; --images '': the text only)

Text: a generated corpus of --rows jsonl rows of about --row-bytes bytes of random words (8 files;
at the defaults 3.2M rows, 1.4 GB), and the same rows as parquet (row groups of 5,000: at 3.2M rows,
10 for each of the 64 partitions). A pass is an epoch of one rank of world size 1, every row once:
its 64 partitions, 32 rows of each in turn (the plan's sample order, a micro-batch at a time), with
the default shuffle blocks (1,024 rows, at most 1 MiB). The start-up is its first round, in which
every partition opens its file and reads its first block; the rates per tenth are over the rows
after it. The rows of a pass are the reader's (``PartitionRows.rows``: a column each of file ids,
indexes and the parsed rows as dicts); the same pass is also timed as the pipeline reads it, as
``Doc``s from ``Partition.read`` (each row with its partition's position), and with its partitions
read one after another after the start-up instead of in turn (the same rows and work, without 64
readers' buffers and blocks taking turns in the caches). The baselines read the
same files front to back with plain Python / pyarrow, in a fresh process like the pass, which has
imported distrain and so has the same Arrow memory pool: jsonl lines parsed with json.loads, parquet
``iter_batches().to_pylist()`` single-threaded (``use_threads=False``, as distrain reads its files)
and with pyarrow's default threads. Every pass and read is timed by the wall clock and by its CPU
time (the pass's thread; every thread of the baseline's process): this machine's speed moves by tens
of per cent between identical runs and within one, and CPU time is the steadier of the two. The
baselines and the pass run --repeat times, alternating, so that a slow spell falls on all of them;
the tables give the best and the median of the runs, and every run's tenths with their last / first
ratio. Partitions per rank: rank 0 of world size 1, 8 and 64 (64, 8 and 1 partitions read in turn)
against the plain read's rate. Bytes per rank: each rank of 1, 2 and 4 reads its partitions in a
process of its own; the bytes are the process's ``rchar`` (/proc/self/io) during the pass. Images:
parquet files of 32x32 PNGs (row groups of 100), resnet-cpu-tiny's pipeline (one DataLoader worker)
at 64 and at 8 partitions streaming 300 batches of 32 in a fresh process; the figures are the peak
RSS (VmHWM) of that process and of its worker.

--instructions: instead of the timed text tables, the instructions a row in each tenth of the pass
(world size 1) and of the plain read, one run of each under valgrind's callgrind, which counts the
instructions the process executes (not its waits on memory): nearly the same count for the same
run (within about 1.5% a tenth), whatever else the machine is doing. The run marks each tenth
through a callgrind client request (a small C library compiled beside the corpus). Needs valgrind,
its headers and a C compiler; a run takes about 100 times as long as without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import distrain  # noqa: E402, F401  (before pyarrow, as in a training process: it picks Arrow's memory pool)


def build_text(root: Path, rows: int, row_bytes: int, files: int = 8) -> None:
    """``rows`` rows of random lowercase words, ``row_bytes`` long on average (from half to 1.5x)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    (root / "jsonl").mkdir(parents=True)
    (root / "parquet").mkdir()
    per = rows // files
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    for f in range(files):
        lengths = rng.integers(row_bytes // 2, row_bytes * 3 // 2, size=per)
        blob = alphabet[rng.integers(0, len(alphabet), size=int(lengths.sum()))].tobytes().decode()
        ends = np.cumsum(lengths)
        texts = [blob[e - n : e] for e, n in zip(ends.tolist(), lengths.tolist(), strict=True)]
        with open(root / "jsonl" / f"part-{f:03d}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"id": f * per + i, "text": t}) + "\n" for i, t in enumerate(texts))
        pq.write_table(
            pa.table({"id": list(range(f * per, (f + 1) * per)), "text": texts}),
            root / "parquet" / f"part-{f:03d}.parquet",
            row_group_size=5_000,
        )


def build_images(path: Path, n: int) -> None:
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(1)
    tiles = []
    for _ in range(256):  # 256 distinct PNGs reused: the bytes and the decode cost are real
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        tiles.append(buf.getvalue())
    path.mkdir(parents=True)
    per_file = 10_000
    for f in range(0, n, per_file):
        k = min(per_file, n - f)
        pq.write_table(
            pa.table(
                {"image": [tiles[(f + i) % 256] for i in range(k)], "label": [(f + i) % 10 for i in range(k)]}
            ),
            path / f"img-{f // per_file:04d}.parquet",
            row_group_size=100,  # 100 row groups a file: even 10,000 images make 64 partitions
        )


def _rchar(_io: list = []) -> int:  # noqa: B006 - the open /proc/self/io, kept between calls
    """Bytes this process has read so far (``rchar`` of /proc/self/io)."""
    if not _io:
        _io.append(open("/proc/self/io", "rb", buffering=0))  # noqa: SIM115
    _io[0].seek(0)
    return int(_io[0].read(4096).split(b"rchar:", 1)[1].split(b"\n", 1)[0])


_CALLGRIND_C = """#include <valgrind/callgrind.h>
void mark(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


def _mark(label: str, _lib: list = []) -> None:  # noqa: B006 - the loaded library, kept between calls
    """Under ``--instructions`` (the process runs under valgrind's callgrind): write out the
    instructions executed since the last mark, named ``label``; otherwise nothing."""
    path = os.environ.get("BENCH_CALLGRIND_LIB")
    if not path:
        return
    if not _lib:
        import ctypes

        _lib.append(ctypes.CDLL(path))
    _lib[0].mark(label.encode())


def plan_pass(
    path: str,
    fmt: str,
    rank: int,
    world: int,
    partitions: int = 64,
    take: int = 32,
    docs: bool = False,
    in_turn: bool = True,
) -> dict:
    """An epoch of rank ``rank``'s partitions, every row once, ``take`` rows of each partition in turn
    (the plan's sample order, a micro-batch at a time): its time, the start-up's (the first round, in
    which every partition opens its file and reads its first block) and the rates over each tenth of
    the rows after the start-up. ``docs``: each partition's rows as the pipeline reads them, ``Doc``s
    with the partition's position before each (``Partition.read``), instead of the reader's ``Rows``.
    ``in_turn=False``: after the start-up, the partitions one after another, each to its end (the
    same rows and work, without 64 readers' buffers and blocks taking turns in the caches)."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401

    # pyarrow's first table imports pandas: before the clock, as in the baseline's process
    pa.table({"a": [0]})

    from distrain.data.plan import ItemPacker, Partition, PartitionRows, Plan, owned
    from distrain.data.sources import build_manifest

    man = build_manifest(path, fmt, "data.train_path")
    plan = Plan([man], [1.0], 0, partitions, 1024, True, block_mb=1.0)
    mine = owned(partitions, rank, world)
    if docs:
        parts = [Partition(plan, p, None, ItemPacker(), None, "skip", False, ["text"]) for p in mine]
        cursors = [part.read for part in parts]
        expect = sum(part.cursors[0].hi - part.cursors[0].lo for part in parts)
    else:
        rows = [PartitionRows(plan, 0, p, loop=False, columns=["text"]) for p in mine]
        cursors = [c.rows for c in rows]
        expect = sum(c.hi - c.lo for c in rows)
    clock = time.thread_time  # the pass's own CPU time: what it costs, whatever else the machine runs
    _mark("start")
    t0, c0, r0 = time.perf_counter(), clock(), _rchar()
    n = sum(len(c(take)) for c in cursors)  # the start-up: every partition opens its file
    t1, c1, n0 = time.perf_counter(), clock(), n
    _mark("mark 0")
    marks, tenth = [(n0, t1, c1, _rchar())], max(1, (expect - n0) // 10)
    for live in [list(cursors)] if in_turn else [[c] for c in cursors]:
        while live:
            keep = []
            for c in live:
                rows = c(take)
                if not rows:
                    continue
                keep.append(c)
                before, n = n, n + len(rows)
                if (n - n0) // tenth > (before - n0) // tenth:
                    marks.append((n, time.perf_counter(), clock(), _rchar()))
                    _mark(f"mark {len(marks) - 1}")
            live = keep
    dt, cpu = time.perf_counter() - t0, clock() - c0
    bytes_read = _rchar() - r0
    assert n == expect, (n, expect)
    return {
        "rows": n,
        "seconds": dt,
        "cpu_seconds": cpu,
        "startup_s": t1 - t0,
        "startup_rows": n0,
        "bytes": bytes_read,
        "mark_rows": [m[0] for m in marks],
        **_tenths(marks),
    }


def _tenths(marks: list[tuple[int, float, float, int]]) -> dict:
    """Rows/s over each tenth of a pass, by the wall clock and by the process's CPU time, and the
    bytes read from the files a row in each tenth, from the (rows, wall, CPU, bytes read) marks at
    (or just past) each tenth."""
    pairs = list(zip(marks, marks[1:], strict=False))[:10]
    return {
        "tenths": [(b[0] - a[0]) / (b[1] - a[1]) for a, b in pairs],
        "cpu_tenths": [(b[0] - a[0]) / max(b[2] - a[2], 1e-9) for a, b in pairs],
        "bytes_tenths": [(b[3] - a[3]) / (b[0] - a[0]) for a, b in pairs],
    }


def plain_pass(path: str, fmt: str, threads: str = "1", total: str = "0") -> dict:
    """The files front to back with plain Python / pyarrow, and the rates over each tenth of the rows.
    ``threads`` "0": parquet read single-threaded (``use_threads=False``, as distrain reads it).
    ``total``: the files' rows, known beforehand, to count the instructions of each tenth (``_mark``)."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    pa.table({"a": [0]})  # pyarrow's first table imports pandas: before the clock, as in plan_pass
    files = sorted(glob.glob(f"{path}/*.{fmt}"))
    clock = time.process_time  # every thread's CPU time: pyarrow's default read uses several
    t0, c0, n, at = time.perf_counter(), clock(), 0, 4096
    marks = [(0, t0, c0, _rchar())]
    rows, tenth = int(total), 1  # the instruction counts: the next tenth to mark

    def mark(n: int) -> None:
        nonlocal at, tenth
        marks.append((n, time.perf_counter(), clock(), _rchar()))
        at += 4096
        if rows and tenth < 10 and n >= tenth * rows // 10:  # the first mark at or past a tenth, as ``cuts``
            _mark(f"mark {tenth}")
            tenth += 1

    _mark("mark 0")
    if fmt == "jsonl":
        for f in files:
            with open(f, "rb") as fh:
                for line in fh:
                    json.loads(line)
                    n += 1
                    if n >= at:
                        mark(n)
    else:
        for f in files:
            batches = pq.ParquetFile(f).iter_batches(
                batch_size=256, columns=["text"], use_threads=threads == "1"
            )
            for b in batches:
                n += len(b.to_pylist())
                if n >= at:
                    mark(n)
    dt, cpu = time.perf_counter() - t0, clock() - c0
    _mark("mark 10")
    marks.append((n, t0 + dt, c0 + cpu, _rchar()))
    # the first mark at or past each tenth of the rows
    cuts = [next(m for m in marks if m[0] >= k * n // 10) for k in range(11)]
    return {"rows": n, "seconds": dt, "cpu_seconds": cpu, "mark_rows": [m[0] for m in cuts], **_tenths(cuts)}


def _best_median(runs: list[dict], key: str) -> str:
    xs = [r[key] for r in runs]
    return f"{min(xs):.2f} ({median(xs):.2f})"


def _ratio(runs: list[dict], base: list[dict], key: str) -> str:
    """best / best (median / median)"""
    a, b = [r[key] for r in runs], [r[key] for r in base]
    return f"{min(a) / min(b):.2f}x ({median(a) / median(b):.2f}x)"


def _child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def instructions(root: Path, args: list[str]) -> tuple[list[float], float]:
    """The instructions a row in each tenth of a ``--child`` run (a pass, or a plain read given its
    row count) and over the ten tenths, counted by valgrind's callgrind: nearly the same count for the
    same run, whatever else the machine does. A small C library (compiled here, beside the corpus)
    lets the run mark each tenth."""
    import re
    import shutil

    lib = root / "libmark.so"
    if not lib.exists():
        (root / "mark.c").write_text(_CALLGRIND_C)
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(root / "mark.c")], check=True)
    out = root / "callgrind"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", "--dump-line=no"]
    res = subprocess.run(
        [*cmd, sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_CALLGRIND_LIB": str(lib), "PYTHONHASHSEED": "0"},
    )
    got = json.loads(res.stdout.strip().splitlines()[-1])
    counts = {}
    for f in out.iterdir():
        text = f.read_text()
        label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        if label:
            counts[label.group(1)] = int(re.search(r"^totals: (\d+)", text, re.M).group(1))
    rows = got["mark_rows"]
    shutil.rmtree(out)
    per = [counts[f"mark {k}"] / (rows[k] - rows[k - 1]) for k in range(1, 11)]
    return per, sum(counts[f"mark {k}"] for k in range(1, 11)) / (rows[10] - rows[0])


def image_rss(path: Path, partitions: int, batches: int = 300) -> dict:
    """Peak RSS of the process tree (a rank and its DataLoader worker) streaming ``batches`` batches."""
    return _child(["images", str(path), str(partitions), str(batches)])


def _hwm(pid: str | int = "self") -> float:
    """Peak resident memory (VmHWM, MiB) of a process since it started (exec resets it, unlike
    ru_maxrss, which a child inherits from the process that forked it)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def _children() -> list[int]:
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(d))
            except OSError:
                continue
    return out


def _child_images(path: str, partitions: int, batches: int) -> dict:
    from distrain.config import load_config
    from distrain.data import DataPipeline

    cfg = load_config(
        REPO / "configs" / "resnet-cpu-tiny.yaml",
        [
            f"data.train_path={path}",
            "data.eval_path=null",
            "data.num_workers=1",
            "data.augment=false",
            f"data.partitions={partitions}",
        ],
    )
    pipe = DataPipeline(cfg)
    it = pipe.train_batches()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    workers = [_hwm(pid) for pid in _children()]
    own = _hwm()
    pipe.close()
    return {"rss_mib": own, "worker_rss_mib": max(workers, default=0.0), "images_per_s": batches * 32 / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_200_000)
    ap.add_argument("--row-bytes", type=int, default=400)
    ap.add_argument("--images", default="10000,100000,300000,1000000")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of the plain read and the pass")
    ap.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary directory)")
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="instead of the timed tables: the instructions a row in each tenth of the pass and of the plain "
        "read, counted by valgrind's callgrind (needs valgrind and a C compiler; about 100x slower)",
    )
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind in ("pass", "docs", "seq"):
            path, fmt, rank, world = rest
            res = plan_pass(path, fmt, int(rank), int(world), docs=kind == "docs", in_turn=kind != "seq")
        elif kind == "plain":
            res = plain_pass(*rest)
        else:
            res = _child_images(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return
    from distrain.tracking import setup_logging

    setup_logging(0, "WARNING")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        os.environ["DISTRAIN_CACHE_DIR"] = str(root / "cache")
        if args.rows and args.instructions:
            instruction_table(root, args)
        elif args.rows:
            text_tables(root, args)
        if args.images:
            images_table(root, args)


# the read each pass's ratios and tenths are set against: parquet's single-threaded read, as distrain reads
_BASELINE = {"jsonl": "plain", "parquet": "single"}
# each read's ``threads`` argument of ``plain_pass``
_THREADS = {"plain": "1", "single": "0"}


def instruction_table(root: Path, args) -> None:
    """The instructions a row in each tenth of the pass (world size 1) and of the plain read, by
    format: the work a row costs along the pass, free of this machine's changing speed."""
    t = time.perf_counter()
    build_text(root, args.rows, args.row_bytes)
    rows = (args.rows // 8) * 8
    print(f"corpus: {rows:,} rows (8 files of each format; written in {time.perf_counter() - t:.0f} s)\n")
    print(
        "| format | run | instructions a row, tenths 1-10 | last / first | tenths 2-10: max / min "
        "| instructions a row, whole | pass / plain read |"
    )
    print("|---|---|---|---|---|---|---|")
    for fmt in ("jsonl", "parquet"):
        path = str(root / fmt)
        plain = instructions(root, ["plain", path, fmt, _THREADS[_BASELINE[fmt]], str(rows)])
        ours = instructions(root, ["pass", f"{path}/*.{fmt}", fmt, "0", "1"])
        for name, (per, whole) in (
            ("plain read" if fmt == "jsonl" else "pyarrow, single-threaded", plain),
            ("pass", ours),
        ):
            print(
                f"| {fmt} | {name} | {', '.join(f'{x:,.0f}' for x in per)} | {per[-1] / per[0]:.3f} "
                f"| {max(per[1:]) / min(per[1:]):.3f} | {whole:,.0f} | {ours[1] / plain[1]:.2f}x |"
            )


def text_tables(root: Path, args) -> None:
    t = time.perf_counter()
    build_text(root, args.rows, args.row_bytes)
    sizes = {fmt: sum(p.stat().st_size for p in (root / fmt).iterdir()) for fmt in ("jsonl", "parquet")}
    print(
        f"corpus: {args.rows:,} rows; jsonl {sizes['jsonl'] / 1e9:.2f} GB, parquet {sizes['parquet'] / 1e9:.2f} GB "
        f"(8 files each; written in {time.perf_counter() - t:.0f} s); {args.repeat} alternating runs of the "
        "plain read and the pass\n"
    )
    from distrain.data.sources import build_manifest

    print(
        "| format | baseline | manifest, cold / cached | baseline, wall s | distrain pass, wall s | pass / baseline, wall "
        "| baseline, CPU s | pass, CPU s | pass / baseline, CPU | start-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs: dict[str, dict[str, list[dict]]] = {}
    for fmt in ("jsonl", "parquet"):
        path = str(root / fmt)
        t = time.perf_counter()
        build_manifest(f"{path}/*.{fmt}", fmt, "k")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        build_manifest(f"{path}/*.{fmt}", fmt, "k")
        warm = time.perf_counter() - t
        got = runs[fmt] = {"plain": [], "pass": [], "docs": [], "seq": [], "single": []}
        for _ in range(args.repeat):  # alternating, so a slow spell of the machine hits all of them
            got["plain"].append(_child(["plain", path, fmt, _THREADS["plain"]]))
            got["pass"].append(_child(["pass", f"{path}/*.{fmt}", fmt, "0", "1"]))
            got["docs"].append(_child(["docs", f"{path}/*.{fmt}", fmt, "0", "1"]))
            got["seq"].append(_child(["seq", f"{path}/*.{fmt}", fmt, "0", "1"]))
            if fmt == "parquet":
                got["single"].append(_child(["plain", path, fmt, _THREADS["single"]]))
        bases = [("plain", "line read + json.loads")]
        if fmt == "parquet":
            bases = [("single", "pyarrow, single-threaded"), ("plain", "pyarrow, default (threaded)")]
        for base, name in bases:
            print(
                f"| {fmt} | {name} | {cold:.2f} s / {warm * 1e3:.0f} ms | {_best_median(got[base], 'seconds')} "
                f"| {_best_median(got['pass'], 'seconds')} | {_ratio(got['pass'], got[base], 'seconds')} "
                f"| {_best_median(got[base], 'cpu_seconds')} | {_best_median(got['pass'], 'cpu_seconds')} "
                f"| {_ratio(got['pass'], got[base], 'cpu_seconds')} | {min(o['startup_s'] for o in got['pass']):.2f} s "
                f"({got['pass'][0]['startup_rows']:,} rows) |"
            )
    print()
    for kind, what in (
        ("docs", "as Docs (Partition.read: each row with its partition's position)"),
        ("seq", "with its partitions one after another instead of in turn"),
    ):
        for fmt, got in runs.items():
            base = _BASELINE[fmt]
            print(
                f"{fmt}, the same pass {what}: "
                f"wall {_best_median(got[kind], 'seconds')}, {_ratio(got[kind], got[base], 'seconds')} the baseline; "
                f"CPU {_best_median(got[kind], 'cpu_seconds')}, {_ratio(got[kind], got[base], 'cpu_seconds')}"
            )
    for fmt, got in runs.items():
        for what, key in (
            ("the pass", "pass"),
            ("the plain read", _BASELINE[fmt]),
        ):
            for clock, field in (("CPU", "cpu_tenths"), ("wall", "tenths")):
                ratios = [r[field][-1] / r[field][0] for r in got[key]]
                print(
                    f"\n{fmt}, rows/s in each tenth of {what} ({clock}); last / first: median {median(ratios):.2f} "
                    f"(runs {', '.join(f'{x:.2f}' for x in ratios)})"
                )
                for i, r in enumerate(got[key]):
                    print(f"  run {i + 1}: " + ", ".join(f"{x:,.0f}" for x in r[field]))
            b = got[key][0]["bytes_tenths"]
            print(f"{fmt}, bytes read a row in each tenth of {what}: " + ", ".join(f"{x:,.0f}" for x in b))
    print(
        "\n| format | world size | partitions per rank | rank 0's rows | baseline, rows/s (wall / CPU) "
        "| rank 0's pass, rows/s (wall / CPU) | pass / baseline, wall, best (median) | pass / baseline, CPU, best (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fmt in ("jsonl", "parquet"):
        path = str(root / fmt)
        plain = [_child(["plain", path, fmt, _THREADS[_BASELINE[fmt]]]) for _ in range(args.repeat)]
        for world in (1, 8, 64):
            runs = [_child(["pass", f"{path}/*.{fmt}", fmt, "0", str(world)]) for _ in range(args.repeat)]
            per = [{k: r[k] / r["rows"] for k in ("seconds", "cpu_seconds")} for r in runs]  # s a row
            base = [{k: r[k] / r["rows"] for k in ("seconds", "cpu_seconds")} for r in plain]
            rate = lambda xs, k: 1 / min(x[k] for x in xs)  # noqa: E731
            print(
                f"| {fmt} | {world} | {64 // world} | {runs[0]['rows']:,} "
                f"| {rate(base, 'seconds'):,.0f} / {rate(base, 'cpu_seconds'):,.0f} "
                f"| {rate(per, 'seconds'):,.0f} / {rate(per, 'cpu_seconds'):,.0f} "
                f"| {_ratio(per, base, 'seconds')} | {_ratio(per, base, 'cpu_seconds')} |"
            )
    print(
        "\n| format | world size | bytes read per rank (min - max) | total / corpus | per rank / (corpus / N) |"
    )
    print("|---|---|---|---|---|")
    for fmt in ("jsonl", "parquet"):
        for world in (1, 2, 4):
            got = [
                _child(["pass", f"{root / fmt}/*.{fmt}", fmt, str(r), str(world)])["bytes"]
                for r in range(world)
            ]
            share = sizes[fmt] / world
            print(
                f"| {fmt} | {world} | {min(got) / 1e6:,.0f} - {max(got) / 1e6:,.0f} MB | {sum(got) / sizes[fmt]:.3f} "
                f"| {min(got) / share:.3f} - {max(got) / share:.3f} |"
            )
    import shutil

    shutil.rmtree(root / "jsonl")
    shutil.rmtree(root / "parquet")


def images_table(root: Path, args) -> None:
    import shutil

    print("\n| parquet images | files | partitions | peak RSS, rank | peak RSS, its worker | images/s |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.images.split(",") if x):
        path = root / f"images-{n}"
        build_images(path, n)
        for k in (64, 8):  # the default, and fewer partitions: memory follows them, not the corpus
            res = image_rss(path, k)
            print(
                f"| {n:,} | {len(list(path.iterdir()))} | {k} | {res['rss_mib']:.0f} MiB | {res['worker_rss_mib']:.0f} MiB "
                f"| {res['images_per_s']:,.0f} |"
            )
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
