"""Where a run's numbers go: RUN_DIR/metrics.jsonl and the console (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from distrain import status

log = logging.getLogger(__name__)

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _KnownNoise(logging.Filter):
    """Drops DeepSpeed warnings about things distrain handles on purpose."""

    _SKIP = (
        "get learning rate from scheduler before it has started",
    )  # the scheduler is primed in build_engine

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in self._SKIP)


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; other ranks log warnings and errors only, tagged with their rank."""
    fmt = _FMT if rank == 0 else f"[rank {rank}] {_FMT}"
    root = logging.getLogger()
    ours = logging.getLogger("distrain")
    for lg in (root, ours):
        for h in list(lg.handlers):
            if getattr(h, "_distrain", False) or type(h) is logging.StreamHandler:
                lg.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._distrain = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    if root.handlers:  # a host process (a Ray worker) logs through its own handlers: leave them be
        ours.addHandler(handler)
        ours.propagate = False
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per report() otherwise
    else:
        ours.propagate = True
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else "WARNING")
    ours.setLevel(level if rank == 0 else "WARNING")
    for noisy in (
        "DeepSpeed",
        "deepspeed",
        "torch.distributed",
        "datasets",
        "httpx",
        "urllib3",
        "filelock",
        "fsspec",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # DeepSpeed's logger does not propagate: quiet it directly
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _KnownNoise) for f in ds_logger.filters):
            ds_logger.addFilter(_KnownNoise())
    except Exception:  # noqa: BLE001 - DeepSpeed not importable is not a logging problem
        pass


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


class JsonlWriter:
    """Appends one JSON object per record; flushed per line so a crash loses nothing written."""

    def __init__(self, path: Path, resume_step: int | None = None):
        """A new file, or (``resume_step``) the existing one without records past that step, which
        an interrupted attempt wrote after its last checkpoint and the resumed run writes again."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if resume_step is not None and path.exists():
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in keep))
            self._f = open(path, "a", buffering=1)
        else:
            self._f = open(path, "w", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._f.close()


class Console:
    """Progress bar with ETA when stderr is a terminal, and a log line per record."""

    def __init__(self, total_steps: int, start_step: int, progress_bar: bool):
        self.bar = None
        self.total = total_steps
        if progress_bar and sys.stderr.isatty():
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=RichConsole(stderr=True),
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def advance(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.bar is not None:
            info = "" if loss is None else f"loss {loss:.4f}"
            if tokens_per_s:
                info += f"  {tokens_per_s:,.0f} tok/s"
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))

    def record(self, rec: dict[str, Any]) -> None:
        parts = [f"step {rec['step']}/{self.total}"]
        each_part = [
            (k, "{:.4f}")
            for k in rec
            if k.startswith(("loss_", "eval_loss_")) and not k.startswith("loss_scale")
        ]
        for key, fmt in (
            ("loss", "{:.4f}"),
            ("eval_loss", "{:.4f}"),
            *each_part,
            ("lr", "{:.3g}"),
            ("grad_norm", "{:.3f}"),
            ("samples_per_s", "{:,.1f}"),
            ("tokens_per_s", "{:,.0f}"),
            ("mfu", "{:.1%}"),
            ("power_w", "{:,.0f} W"),
        ):
            if rec.get(key) is not None:
                parts.append(f"{key} " + fmt.format(rec[key]))
        if rec.get("power_w") is not None and rec.get("energy_estimated"):
            parts[-1] += " (estimated)"
        if self.bar is not None:
            self.bar.console.log(" | ".join(parts))
        else:
            log.info(" | ".join(parts))

    def summary(self, summary: dict[str, Any]) -> None:
        """The end-of-run table (rank 0)."""
        from rich.console import Console as RichConsole
        from rich.table import Table

        table = Table(title=f"run {summary.get('status', '')}", show_header=False, title_justify="left")
        for label, value in summary_rows(summary):
            table.add_row(label, value)
        console = self.bar.console if self.bar is not None else RichConsole(stderr=True, width=100)
        console.print(table)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt(v: Any, fmt: str) -> str:
    return "n/a" if v is None else fmt.format(v)


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the end-of-run summary; shared by the console table and the report."""
    est = " (estimated)" if s.get("energy_estimated") else ""
    rows = [
        ("time", _fmt(s.get("elapsed_s"), "{:,.1f} s")),
        ("steps", f"{s.get('step')}/{s.get('steps')}"),
        ("samples", _fmt(s.get("samples_seen"), "{:,}")),
    ]
    if s.get("tokens_seen"):
        rows.append(("tokens", _fmt(s.get("tokens_seen"), "{:,}")))
    rows.append(("mean MFU", _fmt(s.get("mean_mfu"), "{:.1%}") + f"  (peak: {s.get('peak_source', 'n/a')})"))
    if "energy_j" in s:
        rows += [
            ("energy", _fmt(s.get("energy_kwh"), "{:.4g} kWh") + est + f"  [{s.get('energy_source')}]"),
            (
                "J/token" if s.get("tokens_seen") else "J/sample",
                _fmt(s.get("j_per_token") if s.get("tokens_seen") else s.get("j_per_sample"), "{:.4g}") + est,
            ),
            ("CO2e", _fmt(s.get("co2e_kg"), "{:.4g} kg") + est),
        ]
    rows.append(("data wait", _fmt(s.get("data_wait_pct"), "{:.1f}%")))
    if s.get("final_eval_loss") is not None:
        rows.append(("final eval loss", f"{s['final_eval_loss']:.4f}"))
    return rows


def wandb_mode(configured: str | None) -> str:
    """The W&B mode: as configured, else online when WANDB_API_KEY is set, else offline."""
    if configured:
        return configured
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _redact(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


class WandbSink:
    """One W&B run per job, created by rank 0 only. Its id is kept in checkpoints, so a resumed,
    restarted or requeued job continues the same run (``resume="allow"``); the x-axis is the
    logged ``step``, so W&B's own step keeps rising when a resumed run logs a step again."""

    def __init__(self, cfg, run_dir: Path, run_id: str | None, topology: dict[str, Any]):
        w = cfg.tracking.wandb
        self.mode = wandb_mode(w.mode)
        self.run = None
        self.where = "disabled"
        if self.mode == "disabled":
            return
        try:
            import wandb

            wdir = Path(w.dir).resolve() if w.dir else run_dir
            wdir.mkdir(parents=True, exist_ok=True)
            config = cfg.model_dump(mode="json", by_alias=True)
            config["topology"] = topology
            self.run = wandb.init(
                project=w.project,
                entity=w.entity,
                group=w.group,
                tags=list(w.tags) or None,
                name=w.name or cfg.run.name,
                id=run_id or uuid.uuid4().hex[:12],
                resume="allow",
                dir=str(wdir),
                mode=self.mode,
                config=config,
                settings=wandb.Settings(init_timeout=w.init_timeout, console="off", silent=True),
            )
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            if self.mode == "offline":
                self.where = f"offline in {self.run.dir.rsplit('/files', 1)[0]} (upload: wandb sync {wdir}/wandb/offline-run-*)"
            else:
                self.where = f"online at {self.run.url}"
        except Exception as exc:  # noqa: BLE001 - W&B is optional: never the reason a run fails
            msg = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            log.warning(
                "W&B could not start (%s: %s); training continues with local logging (metrics.jsonl). "
                "Check tracking.wandb.* and WANDB_API_KEY, or set tracking.wandb.mode=disabled",
                type(exc).__name__,
                msg,
            )
            self.run = None
            self.where = "failed to start; local logging only"

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:  # a W&B that fails (its service gone, a full disk) never fails the run
            for k, v in record.items():
                if isinstance(v, (str, bool)):
                    self.run.summary[k] = v
            self.run.log(data)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B logging failed (%s); local logging continues", _redact(str(exc)))
            self.run = None

    def log_image(self, step: int, path: Path, key: str) -> None:
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=f"step {step}"), "step": step})
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B image logging failed (%s); local logging continues", _redact(str(exc)))

    def log_checkpoint(self, step: int, path: Path) -> None:
        if self.run is None:
            return
        import wandb

        art = wandb.Artifact(
            f"{self.run.name}-checkpoint".replace("/", "-"), type="model", metadata={"step": step}
        )
        art.add_reference(Path(path).resolve().as_uri(), checksum=False)
        self.run.log_artifact(art, aliases=[f"step-{step}", "latest"])

    def finish(self, summary: dict[str, Any] | None) -> None:
        if self.run is None:
            return
        try:
            if summary is not None:
                import wandb

                for k, v in summary.items():
                    if isinstance(v, (int, float, str, bool)) or v is None:
                        self.run.summary[k] = v
                self.run.log(
                    {
                        "summary_table": wandb.Table(
                            columns=["metric", "value"], data=[list(r) for r in summary_rows(summary)]
                        )
                    }
                )
            self.run.finish(exit_code=0 if summary and summary.get("status") == "completed" else 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B could not finish the run cleanly (%s)", _redact(str(exc)))
        self.run = None


class Tracker:
    """Rank 0 writes (metrics.jsonl, console, W&B); every other rank holds a Tracker that does
    nothing and never imports wandb. Nothing is written before ``start``: a resumed run first
    restores the tracker's state (its W&B run id) from the checkpoint."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, topology: dict[str, Any]):
        self.cfg, self.run_dir, self.enabled, self.topology = cfg, run_dir, enabled, topology
        self.jsonl: JsonlWriter | None = None
        self.console: Console | None = None
        self.wandb: WandbSink | None = None
        self._run_id: str | None = None
        self._resumed = False

    def state_dict(self) -> dict[str, Any]:
        run_id = self.wandb.run_id if self.wandb else self._run_id
        return {"wandb_run_id": run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run: the same W&B run, and metrics.jsonl continued from the resumed step."""
        self._run_id = state.get("wandb_run_id")
        self._resumed = True

    def start(self, step: int) -> None:
        """Open the outputs (rank 0), the run continuing at ``step``: metrics.jsonl (without the
        records an interrupted attempt wrote after ``step``), the console and the W&B run."""
        if not self.enabled:
            return
        cfg = self.cfg
        if cfg.metrics.jsonl:
            self.jsonl = JsonlWriter(self.run_dir / "metrics.jsonl", step if self._resumed else None)
        self.console = Console(cfg.train.steps, step, cfg.tracking.progress_bar)
        self.wandb = WandbSink(cfg, self.run_dir, self._run_id, self.topology)

    @property
    def wandb_where(self) -> str:
        return self.wandb.where if self.wandb else "rank 0 only"

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self.console is None:
            return
        if self.jsonl:
            self.jsonl.write(record)
        self.console.record(record)
        self.wandb.log(record)
        status.beat(self.run_dir, record["step"], self.cfg.train.steps)  # the run is alive

    def log_image(self, step: int, path: Path, key: str = "samples") -> None:
        """An image file (a sample grid) as a W&B image at ``step`` (rank 0)."""
        if self.enabled and self.wandb is not None:
            self.wandb.log_image(step, path, key)

    def log_checkpoint(self, step: int, path: Path) -> None:
        if self.enabled and self.wandb is not None:
            try:
                self.wandb.log_checkpoint(step, path)
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B checkpoint artifact failed (%s)", _redact(str(exc)))

    def summary(self, summary: dict[str, Any]) -> None:
        if self.console:
            self.console.summary(summary)
        if self.wandb:
            self.wandb.finish(summary)

    def abort(self) -> None:
        if self.wandb:
            self.wandb.finish(None)

    def progress(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.console:
            self.console.advance(step, loss, tokens_per_s)

    def close(self) -> None:
        if self.console:
            self.console.close()
        if self.jsonl:
            self.jsonl.close()
