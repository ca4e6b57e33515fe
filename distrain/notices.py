"""Stop notices that reach a run without signal handlers: Ray Train runs the training loop in a
worker thread, where none can be installed, so the launcher (which has the signal) writes a notice
file in the run directory (``distrain.cluster.control``) and rank 0 polls it between steps with a
``StopWatch``; the trainer's per-step agreement then stops every rank at one step boundary. A notice
is for one launch only (its id), so a stale file never stops the next job. The job's end
(``DISTRAIN_DEADLINE``, seconds since the epoch, set by the Slurm job script) is watched the same
way: rank 0 asks to stop while there is still time to save.

An elastic Ray job is told the same way that its worker group is about to be resized (a node is
drained, or more workers fit): a ``resize`` notice, which the worker group that starts after the
resize finds already there and ignores."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

LAUNCH_ID = "DISTRAIN_LAUNCH_ID"
DEADLINE = "DISTRAIN_DEADLINE"
RESIZE = "resize"
POLL_S = 1.0


def notice_path(run_dir: Path) -> Path:
    return Path(run_dir) / "control" / "stop.json"


def read_notice(path: Path) -> dict:
    """The notice at ``path`` ({} when there is none, or it cannot be read)."""
    try:
        notice = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return notice if isinstance(notice, dict) else {}


class StopWatch:
    """Rank 0's view of the outside world between steps: a stop notice for this launch, or the job's
    end coming closer than what a step and a save take (``margin``)."""

    def __init__(self, run_dir: Path):
        self.path = notice_path(run_dir)
        self.launch = os.environ.get(LAUNCH_ID)
        deadline = os.environ.get(DEADLINE)
        self.deadline = float(deadline) if deadline else None
        self._next = 0.0
        self.step_s = 0.0  # the slowest recent step
        self.save_s = 0.0  # the last save
        self._last = time.monotonic()
        old = read_notice(self.path)  # a resize notice already there was for the worker group before this one
        self._seen = old.get("id") if old.get("reason") == RESIZE else None

    def stepped(self) -> None:
        now = time.monotonic()
        dt, self._last = now - self._last, now
        self.step_s = max(dt, 0.9 * self.step_s)

    def saved(self, seconds: float) -> None:
        self.save_s = seconds
        self._last = time.monotonic()

    def margin(self) -> float:
        """Seconds before the deadline at which to stop: two steps (the agreement lags one), the save,
        and a safety of 15 s plus half the save for the job's own exit."""
        return 15.0 + 2 * self.step_s + 1.5 * self.save_s

    def check(self) -> str | None:
        """Why to stop now ("preempted" for a notice, "resize" for a resize notice, "time limit" for
        the deadline), or None."""
        if self.deadline is not None and self.deadline - time.time() < self.margin():
            return "time limit"
        now = time.monotonic()
        if self.launch is None or now < self._next:
            return None
        self._next = now + POLL_S
        notice = read_notice(self.path)
        if notice.get("launch") != self.launch:
            return None
        if notice.get("reason") == RESIZE:
            return RESIZE if notice.get("id") != self._seen else None
        return "preempted"
