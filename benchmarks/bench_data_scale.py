"""The data plan at corpus scale: manifest build time, a pass's rate over its first and last 10%
against a plain read of the same files, bytes read per rank at 1, 2 and 4 ranks, and the peak RSS of
a rank streaming 10k to 1M parquet images at 64 and at 8 partitions.

    python benchmarks/bench_data_scale.py [--rows 3200000] [--row-bytes 400] [--images 10000,100000,300000,1000000]
        [--repeat 3]   (--rows 0: the images only; --images '': the text only)

Text: a generated corpus of --rows jsonl rows of about --row-bytes bytes of random words (8 files;
at the defaults 3.2M rows, 1.4 GB), and the same rows as parquet (row groups of 5,000: at 3.2M rows,
10 for each of the 64 partitions, so they all end together and the last tenth is read by all of
them). A pass is what one rank of world size 1 reads in an epoch's worth of its stream: its 64
partitions, 32 rows of each in turn (the plan's sample order, a micro-batch at a time), with the
default shuffle blocks (1,024 rows, at most 1 MiB). The start-up is the first round, in which every
partition opens its file and reads its first block; the pass goes on for as many rows as the epoch
has, each partition into its next epoch as in training (see plan_pass), and the rates per tenth are
over the rows after the start-up. The bytes per rank are over a single pass that reads every row of
the epoch once. The rows of a pass are the reader's (``PartitionRows.rows``: a column each of file
ids, indexes and the parsed rows as dicts); the same pass is also timed as the pipeline reads it, as
``Doc``s from ``Partition.read`` (each row with its partition's position). The baseline reads the
same files front to back with plain Python / pyarrow: jsonl lines parsed with json.loads, parquet
``iter_batches().to_pylist()``, in a fresh process like the pass, which has imported distrain and so
has the same Arrow memory pool as the pass; parquet also single-threaded (``use_threads=False``, as
distrain reads its files). The plain read and the pass run --repeat times, alternating, so that a
slow spell of the machine falls on both; the tables give the best and the median of the runs, and
each tenth's rate (the plain read's too) at its best over the runs. Partitions per rank: rank 0 of
world size 1, 8 and 64 (64, 8 and 1 partitions read in turn) against the plain read's rate. Bytes
per rank: each rank of 1, 2 and 4 reads its partitions in a process of its own; the bytes are the
process's ``rchar`` (/proc/self/io) during the pass. Images: parquet files of 32x32 PNGs (row groups
of 100), resnet-cpu-tiny's pipeline (one DataLoader worker) at 64 and at 8 partitions streaming 300
batches of 32 in a fresh process; the figures are the peak RSS (VmHWM) of that process and of its
worker.
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


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def plan_pass(
    path: str,
    fmt: str,
    rank: int,
    world: int,
    partitions: int = 64,
    take: int = 32,
    stream: bool = False,
    docs: bool = False,
) -> dict:
    """One epoch's worth of rank ``rank``'s partitions, ``take`` rows of each in turn: the start-up
    (the first round, in which every partition opens its file and reads its first block) and the
    rates over each tenth of the rest. Without ``stream`` each partition stops at its epoch's end and
    every row is read once; the last tenth then has less left to read than the others (a partition
    reads a block when it starts handing it out, and the start-up read the first). ``stream``: the
    partitions go on into their next epoch, as in training, and the pass is an epoch's worth of rows
    after the start-up, so its last tenth reads the next epoch's first blocks as the start-up read
    this one's. ``docs``: each partition's rows as the pipeline reads them, ``Doc``s with the
    partition's position before each (``Partition.read``), instead of the reader's ``Rows``."""
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
        parts = [Partition(plan, p, None, ItemPacker(), None, "skip", stream, ["text"]) for p in mine]
        cursors = [part.read for part in parts]
        expect = sum(part.cursors[0].hi - part.cursors[0].lo for part in parts)
    else:
        rows = [PartitionRows(plan, 0, p, loop=stream, columns=["text"]) for p in mine]
        cursors = [c.rows for c in rows]
        expect = sum(c.hi - c.lo for c in rows)
    t0, r0 = time.perf_counter(), _rchar()
    n = sum(len(c(take)) for c in cursors)  # the start-up: every partition opens its file
    t1, n0 = time.perf_counter(), n
    if stream:
        expect += n0
    marks, tenth = [], max(1, (expect - n0) // 10)
    live = list(cursors)
    while live and n < expect:
        keep = []
        for c in live:
            rows = c(min(take, expect - n))
            if not rows:
                continue
            keep.append(c)
            before, n = n, n + len(rows)
            if (n - n0) // tenth > (before - n0) // tenth:
                marks.append((n, time.perf_counter()))
            if n >= expect:
                break
        live = keep
    dt = time.perf_counter() - t0
    bytes_read = _rchar() - r0
    assert n == expect, (n, expect)
    steps = [(n0, t1), *marks]
    rates = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(steps, steps[1:], strict=False)][:10]
    return {
        "rows": n,
        "seconds": dt,
        "startup_s": t1 - t0,
        "startup_rows": n0,
        "bytes": bytes_read,
        "first": rates[0],
        "last": rates[-1],
        "tenths": rates,
    }


def plain_pass(path: str, fmt: str, threads: str = "1") -> dict:
    """The files front to back with plain Python / pyarrow, and the rates over each tenth of the rows.
    ``threads`` "0": parquet read single-threaded (``use_threads=False``, as distrain reads it)."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    pa.table({"a": [0]})  # pyarrow's first table imports pandas: before the clock, as in plan_pass
    files = sorted(glob.glob(f"{path}/*.{fmt}"))
    t0, n, at = time.perf_counter(), 0, 4096
    marks = [(0, t0)]
    if fmt == "jsonl":
        for f in files:
            with open(f, "rb") as fh:
                for line in fh:
                    json.loads(line)
                    n += 1
                    if n >= at:
                        marks.append((n, time.perf_counter()))
                        at += 4096
    else:
        for f in files:
            batches = pq.ParquetFile(f).iter_batches(
                batch_size=256, columns=["text"], use_threads=threads == "1"
            )
            for b in batches:
                n += len(b.to_pylist())
                if n >= at:
                    marks.append((n, time.perf_counter()))
                    at += 4096
    dt = time.perf_counter() - t0
    marks.append((n, t0 + dt))
    # the first mark at or past each tenth of the rows
    cuts = [next(m for m in marks if m[0] >= k * n // 10) for k in range(11)]
    tenths = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(cuts, cuts[1:], strict=False)]
    return {"rows": n, "seconds": dt, "tenths": tenths}


def _child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind in ("pass", "stream", "docs"):
            path, fmt, rank, world = rest
            res = plan_pass(path, fmt, int(rank), int(world), stream=kind != "pass", docs=kind == "docs")
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
        if args.rows:
            text_tables(root, args)
        if args.images:
            images_table(root, args)


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
        "| format | manifest, cold | manifest, cached | plain read, best (median) | distrain pass, best (median) "
        "| pass / plain, best (median) | start-up | rows/s first 10% | rows/s last 10% | last / first |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    tenths, single, passes, plains, docs = [], [], {}, {}, {}
    for fmt in ("jsonl", "parquet"):
        path = str(root / fmt)
        t = time.perf_counter()
        build_manifest(f"{path}/*.{fmt}", fmt, "k")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        build_manifest(f"{path}/*.{fmt}", fmt, "k")
        warm = time.perf_counter() - t
        plain, ours = [], []
        for _ in range(args.repeat):  # alternating, so a slow spell of the machine hits both
            plain.append(_child(["plain", path, fmt]))
            ours.append(_child(["stream", f"{path}/*.{fmt}", fmt, "0", "1"]))
            docs.setdefault(fmt, []).append(_child(["docs", f"{path}/*.{fmt}", fmt, "0", "1"]))
            if fmt == "parquet":
                single.append(_child(["plain", path, fmt, "0"]))
        ps, os_ = [p["seconds"] for p in plain], [o["seconds"] for o in ours]
        passes[fmt], plains[fmt] = os_, ps
        # each tenth at its best over the runs: the pass's own cost, without the machine's slow spells
        best = [max(o["tenths"][i] for o in ours) for i in range(len(ours[0]["tenths"]))]
        plain_best = [max(p["tenths"][i] for p in plain) for i in range(10)]
        tenths.append((fmt, best, [o["tenths"] for o in ours], plain_best, [p["tenths"] for p in plain]))
        rows = plain[0]["rows"]
        print(
            f"| {fmt} | {cold:.2f} s | {warm * 1e3:.0f} ms | {min(ps):.1f} s ({median(ps):.1f} s; {rows / min(ps):,.0f} rows/s) "
            f"| {min(os_):.1f} s ({median(os_):.1f} s) | {min(os_) / min(ps):.2f}x ({median(os_) / median(ps):.2f}x) "
            f"| {min(o['startup_s'] for o in ours):.2f} s ({ours[0]['startup_rows']:,} rows) | {best[0]:,.0f} | {best[-1]:,.0f} "
            f"| {best[-1] / best[0]:.2f} |"
        )
    ss, os_ = [s["seconds"] for s in single], passes["parquet"]
    print(
        f"\nparquet, plain read single-threaded (use_threads=False, as distrain reads): {min(ss):.1f} s "
        f"({median(ss):.1f} s; {single[0]['rows'] / min(ss):,.0f} rows/s); pass / it {min(os_) / min(ss):.2f}x "
        f"({median(os_) / median(ss):.2f}x)"
    )
    print()
    for fmt, runs in docs.items():
        ds, ps = [d["seconds"] for d in runs], plains[fmt]
        print(
            f"{fmt}, the same pass as Docs (Partition.read: each row with its partition's position): "
            f"{min(ds):.1f} s ({median(ds):.1f} s); / the plain read {min(ds) / min(ps):.2f}x ({median(ds) / median(ps):.2f}x)"
        )
    for fmt, best, runs, plain_best, plain_runs in tenths:
        for what, b, rs in (
            ("the pass after the start-up", best, runs),
            ("the plain read", plain_best, plain_runs),
        ):
            print(
                f"\n{fmt}, rows/s in each tenth of {what}, best of the runs (last / first {b[-1] / b[0]:.2f}): "
                + ", ".join(f"{r:,.0f}" for r in b)
            )
            for i, rates in enumerate(rs):
                print(f"  run {i + 1}: " + ", ".join(f"{r:,.0f}" for r in rates))
    print(
        "\n| format | world size | partitions per rank | rank 0's rows | plain read, rows/s | rank 0's pass, rows/s | plain / pass, best (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for fmt in ("jsonl", "parquet"):
        path = str(root / fmt)
        plain = [_child(["plain", path, fmt]) for _ in range(args.repeat)]
        plain_rates = [p["rows"] / p["seconds"] for p in plain]
        for world in (1, 8, 64):
            runs = [_child(["stream", f"{path}/*.{fmt}", fmt, "0", str(world)]) for _ in range(args.repeat)]
            rates = [r["rows"] / r["seconds"] for r in runs]
            print(
                f"| {fmt} | {world} | {64 // world} | {runs[0]['rows']:,} | {max(plain_rates):,.0f} | {max(rates):,.0f} "
                f"| {max(plain_rates) / max(rates):.2f}x ({median(plain_rates) / median(rates):.2f}x) |"
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
