"""The one entry every launcher ends in: config -> parts -> Trainer.train() -> close."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from distrain.config import Config, to_yaml

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything one rank builds for a run."""

    cfg: Config
    dist: Any
    engine: Any
    trainer: Any
    tracker: Any


def setup(cfg: Config) -> Session:
    """Initialise torch.distributed and build data, model, engine, tracker and trainer for this rank."""
    import torch

    from distrain.checkpoint import Checkpointer, CheckpointError, list_checkpoints, resume_plan
    from distrain.data import DataPipeline
    from distrain.models import build_model
    from distrain.parallel import build_engine, init_distributed
    from distrain.tracking import Tracker, setup_logging
    from distrain.trainer import Trainer

    dist_info = init_distributed(cfg)
    setup_logging(dist_info.rank, cfg.run.log_level)
    run_dir = cfg.run.run_dir.resolve()
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = DataPipeline(cfg, dist_info.rank, dist_info.world_size, pin_memory=dist_info.device.type == "cuda")
    model = build_model(cfg)  # seeded by run.seed: identical on every rank
    torch.manual_seed(cfg.run.seed + dist_info.rank)  # dropout and augmentation differ per rank
    n_params = sum(p.numel() for p in model.parameters())
    plan = None
    if cfg.checkpoint.resume:
        plan = resume_plan(run_dir / "checkpoints", dist_info.rank, dist_info.world_size)
    elif list_checkpoints(run_dir / "checkpoints"):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints and checkpoint.resume=false; pick another run.dir, or set checkpoint.resume=true to continue it"
        )
    engine = build_engine(cfg, model, dist_info.world_size, load_universal=bool(plan and "universal" in plan))
    trainer = Trainer(cfg, engine, data, dist_info, tracker=None)
    trainer.checkpointer = Checkpointer(cfg, engine, trainer, run_dir)
    resumed_from = trainer.checkpointer.load(plan) if plan else None
    trainer.tracker = tracker = Tracker(
        run_dir,
        dist_info.is_main,
        cfg.metrics.jsonl,
        cfg.train.steps,
        resumed_from or 0,
        cfg.tracking.progress_bar,
        resumed=resumed_from is not None,
    )
    log.info(
        "distrain: run %s | dir %s | world size %d | device %s | model %s (%.2fM params) | ZeRO %d | %s",
        cfg.run.name,
        run_dir,
        dist_info.world_size,
        dist_info.device,
        cfg.model.name,
        n_params / 1e6,
        cfg.parallel.zero_stage,
        cfg.parallel.precision,
    )
    return Session(cfg=cfg, dist=dist_info, engine=engine, trainer=trainer, tracker=tracker)


def run(cfg: Config, session: Session | None = None) -> dict[str, Any]:
    """Train per ``cfg`` in this process (one rank of the job); returns the run summary, which rank 0
    also writes to RUN_DIR/summary.json (a run's success is that record, not the exit path)."""
    s = session or setup(cfg)
    s.trainer.install_signal_handlers()
    try:
        summary = s.trainer.train()
    finally:
        s.tracker.close()
        s.trainer.data.close()
        if s.trainer.checkpointer is not None:
            s.trainer.checkpointer.close()  # a background save finishes before the run is reported
    run_dir = cfg.run.run_dir.resolve()
    summary.update(run_dir=str(run_dir), world_size=s.dist.world_size, finished_at=time.time())
    if s.dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        s.tracker.summary(summary)
        log.info(
            "run %s: %s at step %d/%d in %.1fs",
            cfg.run.name,
            summary["status"],
            summary["step"],
            summary["steps"],
            summary["elapsed_s"],
        )
    return summary
