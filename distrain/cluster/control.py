"""The launcher's side of the stop notices (``distrain.notices``, which rank 0 reads between steps):
each launch gets an id its workers inherit, and a signal, a Slurm notice or a coming resize becomes a
notice file for that launch in the run directory."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from distrain.notices import LAUNCH_ID, notice_path


def new_launch() -> str:
    """This launch's id, in the environment its workers inherit."""
    launch = uuid.uuid4().hex[:16]
    os.environ[LAUNCH_ID] = launch
    return launch


def write_notice(run_dir: Path, launch: str, reason: str) -> str:
    """Ask launch ``launch`` of the run to checkpoint and stop (safe in a signal handler: one small
    atomic write); ``reason`` "resize" for a worker group about to be resized. Returns its id."""
    path = notice_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    notice = uuid.uuid4().hex[:12]
    tmp.write_text(json.dumps({"launch": launch, "reason": reason, "time": time.time(), "id": notice}))
    os.replace(tmp, path)
    return notice
