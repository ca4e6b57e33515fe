"""Checkpoints: DeepSpeed's sharded engine state plus the trainer's own state, under RUN_DIR/checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, cfg, engine, trainer, run_dir: Path):
        self.cfg, self.engine, self.trainer = cfg.checkpoint, engine, trainer
        self.root = run_dir / "checkpoints"

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.every_steps
        return (every > 0 and step % every == 0) or (last and self.cfg.at_end)

    def save(self, step: int) -> Path:
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(
            str(self.root), tag=tag, client_state={"trainer": self.trainer.state_dict()}
        )
        # every rank's data position (DeepSpeed keeps client_state from one rank only)
        rank = self.trainer.dist.rank
        torch.save(self.trainer.data.state_dict(), self.root / tag / f"data-rank{rank:05d}.pt")
        log.info("checkpoint saved: %s", self.root / tag)
        return self.root / tag
