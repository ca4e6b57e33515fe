"""Data pipeline throughput against the rate the tiny CPU configs consume data, and the share of
step time spent waiting for data.

    python benchmarks/bench_data.py [--mb 40] [--seconds 20] [--workers 0,1]

Text: a jsonl corpus of the Python standard library's own source files (--mb megabytes, 8 shards)
read, byte-tokenized and packed by distrain's pipeline (configs/gpt-cpu-tiny.yaml shapes), with no
training; then `distrain train` of that config on the corpus gives the consumption rate and the
data-wait share. Images: the digits ImageFolder written by `distrain data prepare` through the
configs/resnet-cpu-tiny.yaml pipeline, likewise. Run it where `distrain data prepare` wrote data/.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_corpus(out: Path, mb: float, shards: int = 8) -> tuple[list[Path], int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    outs = [open(out / f"stdlib-{i:02d}.jsonl", "w") for i in range(shards)]
    total, n = 0, 0
    for i, p in enumerate(files):
        text = p.read_text(errors="replace")
        outs[i % shards].write(json.dumps({"path": str(p.relative_to(stdlib)), "text": text}) + "\n")
        total += len(text.encode())
        n += 1
        if total >= mb * 1e6:
            break
    for f in outs:
        f.close()
    return [out / f"stdlib-{i:02d}.jsonl" for i in range(shards)], n


def pipeline_rate(cfg, seconds: float) -> dict[str, float]:
    """Batches/s, samples/s, tokens/s and documents/s of the training stream alone."""
    from distrain.data import DataPipeline

    pipe = DataPipeline(cfg)
    it = pipe.train_batches()
    next(it)  # start-up (worker processes, first file) is not throughput
    t0, batches, samples, tokens, docs = time.perf_counter(), 0, 0, 0, 0
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        batches += 1
        if "input_ids" in b:
            samples += b["input_ids"].shape[0]
            tokens += b["input_ids"].numel()
            docs += int((b["input_ids"] == pipe.tokenizer.eos_id).sum())
        else:
            samples += b["images"].shape[0]
    dt = time.perf_counter() - t0
    return {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "rows_per_s": docs / dt}


def consumption(cfg) -> dict[str, float]:
    """Steady-state rate and data-wait share of a real training run (records after the first)."""
    from distrain.train import run

    run(cfg)
    recs = [json.loads(line) for line in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r][1:]
    mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
    out = {"samples_per_s": mean("samples_per_s"), "data_wait_pct": mean("data_wait_pct")}
    if "tokens_per_s" in recs[0]:
        out["tokens_per_s"] = mean("tokens_per_s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--workers", default="0,1", help="data.num_workers values for data.engine=torch")
    ap.add_argument(
        "--ray", action="store_true", help="also measure data.engine=ray (a local Ray on a loopback address)"
    )
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    from distrain.config import load_config
    from distrain.tracking import setup_logging

    setup_logging(0, "WARNING")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        _, n_files = build_corpus(corpus, args.mb)
        mb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
        variants = [(f"data.num_workers={w}", f"torch, {w} workers") for w in args.workers.split(",")]
        if args.ray:
            variants.append(("data.engine=ray", "ray, 1 actor"))
        for i, (variant, w) in enumerate(variants):
            common = [
                variant,
                "data.eval_path=null",
                "checkpoint.at_end=false",
                "tracking.progress_bar=false",
                "run.log_level=WARNING",
                f"train.steps={args.steps}",
                "train.log_every=10",
            ]
            text = load_config(
                REPO / "configs" / "gpt-cpu-tiny.yaml",
                [*common, f"data.train_path={corpus}/*.jsonl", f"run.dir={tmp}/t{i}"],
            )
            img = load_config(REPO / "configs" / "resnet-cpu-tiny.yaml", [*common, f"run.dir={tmp}/i{i}"])
            for name, cfg in (("text (gpt-cpu-tiny)", text), ("images (resnet-cpu-tiny)", img)):
                rate = pipeline_rate(cfg, args.seconds)
                use = consumption(cfg)
                rows.append((name, w, rate, use))
    print(f"corpus: {n_files} standard-library files, {mb:.1f} MB of jsonl in 8 shards\n")
    print(
        "| pipeline | data.engine | pipeline rate | training consumes | pipeline / consumption | data wait, % of step time |"
    )
    print("|---|---|---|---|---|---|")
    for name, w, rate, use in rows:
        if "tokens_per_s" in use:
            pr = f"{rate['tokens_per_s']:,.0f} tokens/s ({rate['rows_per_s']:,.0f} rows/s)"
            cr, ratio = f"{use['tokens_per_s']:,.0f} tokens/s", rate["tokens_per_s"] / use["tokens_per_s"]
        else:
            pr, cr = f"{rate['samples_per_s']:,.0f} images/s", f"{use['samples_per_s']:,.0f} images/s"
            ratio = rate["samples_per_s"] / use["samples_per_s"]
        print(f"| {name} | {w} | {pr} | {cr} | {ratio:.1f}x | {use['data_wait_pct']:.2f} |")


if __name__ == "__main__":
    main()
