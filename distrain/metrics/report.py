"""``distrain report RUN_DIR``: PNG plots and a markdown summary from a run's own files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distrain.errors import UserError

PLOTS = {  # file -> (title, [(metrics.jsonl key, legend label)])
    "loss.png": ("loss", [("loss", "train"), ("eval_loss", "eval")]),  # and each part's (``_loss_keys``)
    "sample_quality.png": (
        "samples scored by metrics.sample_scorer",
        [("sample_confidence", "top-class confidence"), ("sample_class_entropy", "class entropy (nats)")],
    ),
    "throughput.png": ("throughput", [("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s")]),
    "mfu.png": ("MFU", [("mfu", "MFU"), ("hfu", "HFU")]),
    "power.png": ("power (W)", [("power_w", "job power")]),
    "energy.png": ("cumulative energy (kWh)", [("energy_kwh", "energy")]),
}


class ReportError(UserError):
    """A run directory without the records a report is made of."""


def read_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(
            f"{metrics} does not exist; pass the run directory of a run that wrote metrics (metrics.jsonl=true)"
        )
    records = []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ReportError(
                f"{metrics}, line {n}: not JSON ({exc.msg}); remove or repair that line"
            ) from None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return records, summary


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _loss_keys(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The loss curves of a run: train and eval, and for a model of several parts each part's
    (``loss_<part>``, ``eval_loss_<part>``)."""
    keys = dict.fromkeys(k for r in records for k in r)
    parts = [k[5:] for k in keys if k.startswith("loss_") and not k.startswith("loss_scale")]
    return PLOTS["loss.png"][1] + [
        pair
        for part in parts
        for pair in ((f"loss_{part}", f"{part} train"), (f"eval_loss_{part}", f"{part} eval"))
    ]


def _plots(records: list[dict], out: Path) -> list[str]:
    """Write the plots that have data into ``out``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimated = any(r.get("energy_estimated") for r in records)
    written = []
    for fname, (title, keys) in PLOTS.items():
        keys = _loss_keys(records) if fname == "loss.png" else keys
        lines = [(label, *_series(records, k)) for k, label in keys]
        lines = [ln for ln in lines if ln[1]]
        if not lines:
            continue
        if fname == "throughput.png":
            lines = lines[:1]  # tokens/s where the model has tokens, else samples/s
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, xs, ys in lines:
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(title + (" (estimated)" if estimated and fname in ("power.png", "energy.png") else ""))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(fname)
    return written


def _samples(run_dir: Path, records: list[dict], out: Path) -> list[str]:
    """A generative model's newest sample grid, copied into ``out``, and its lines of the report."""
    grids = sorted((run_dir / "samples").glob("step*.png"))
    if not grids:
        return []
    import shutil

    shutil.copyfile(grids[-1], out / "samples.png")
    md = [
        f"Samples at step {int(grids[-1].stem[4:])} (from a fixed latent batch):",
        "",
        "![samples](samples.png)",
        "",
    ]
    scored = [r for r in records if "sample_confidence" in r]
    if scored:
        last = scored[-1]
        md += [
            f"Scored by metrics.sample_scorer at step {last['step']}: top-class confidence "
            f"{last['sample_confidence']:.3f}, class entropy {last['sample_class_entropy']:.3f} nats.",
            "",
        ]
    return md


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the plots that have data and ``report.md`` into ``out`` (default RUN_DIR/report)."""
    from distrain.tracking import summary_rows

    run_dir = Path(run_dir)
    records, summary = read_run(run_dir)
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = _plots(records, out)
    md = [f"# Run report: {run_dir.name}", ""]
    if summary is not None:
        md += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(summary)] + [""]
    else:
        md += ["No summary.json: the run has not finished (or was killed); plots cover what it logged.", ""]
    md += _samples(run_dir, records, out)
    md += [f"![{f[:-4]}]({f})" for f in written]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out
