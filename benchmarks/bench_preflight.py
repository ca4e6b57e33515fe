"""What the driver's launch checks cost as a corpus grows: ``distrain.layout.preflight`` (run
directory, manifests, partitions derived for the world sizes, tokenizer, chunks, eval path) against
the manifest read alone (``build_manifest`` on a warm cache, which any launch that reads the data
must do), at three corpus sizes and at 8 and 1,024 ranks.

    python benchmarks/bench_preflight.py [--files 100 1000 10000] [--repeats 5]

Corpus: jsonl files of 64 short documents each, written once into a temporary directory; the
manifest cache is warmed before timing (as `distrain data index` leaves it before a job).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _corpus(root: Path, files: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(root / f"part-{f:06d}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": f"document {f}.{r} " * 8}) + "\n" for r in range(64))
    return str(root / "part-*.jsonl")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DISTRAIN_CACHE_DIR"] = str(Path(tmp) / "cache")
        from distrain.config import load_config
        from distrain.data.sources import build_manifest
        from distrain.layout import preflight

        print(
            "| files | rows | ranks | partitions | manifest read (s) | preflight (s) | preflight / manifest |"
        )
        print("|---|---|---|---|---|---|---|")
        for files in args.files:
            path = _corpus(Path(tmp) / f"c{files}", files)
            build_manifest(path, "jsonl", "data.train_path")  # warm the cache
            base = _best(lambda p=path: build_manifest(p, "jsonl", "data.train_path"), args.repeats)
            for ranks in (8, 1024):
                cfg = load_config(
                    REPO / "configs" / "gpt-cpu-tiny.yaml",
                    [
                        f"data.train_path={path}",
                        "data.eval_path=null",
                        f"run.dir={tmp}/run",
                        f"cluster.workers={ranks}",
                    ],
                )
                out: list = []
                t = _best(
                    lambda c=cfg, r=ranks, o=out: o.append(preflight(c, [r], f"cluster.workers={r}")),
                    args.repeats,
                )
                k = out[-1][0].data.partitions
                print(
                    f"| {files:,} | {files * 64:,} | {ranks:,} | {k:,} | {base:.3f} | {t:.3f} | {t / base:.2f}x |"
                )


if __name__ == "__main__":
    main()
