"""One run's state for every launcher, read from its run directory.

Two records tell it, both written atomically:

- ``summary.json``: how the run (its latest attempt) ended. Rank 0 writes it at the end
  (completed, preempted, interrupted); any rank that raises writes ``status: failed`` with the step,
  the error and its type, the first failure of an attempt winning (a rank that fails because
  another died does not overwrite the cause); a Ray driver whose workers died without a record
  writes it from Ray's error. An attempt's start removes the summary of the attempt before.
- ``heartbeat.json``: written by rank 0 when the run starts and on every log step: the time, the
  step, the process and host, the seconds between beats.

``status`` tells from them (and Slurm's queue for a Slurm job) whether the run is running,
completed, failed, preempted or stopped: a run whose heartbeat's process is gone (kill -9 of the
whole job), or whose heartbeat from another host is far older than its beat, is stopped, with the
time of its last heartbeat.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distrain.errors import EXIT_PREEMPTED, ConfigError, UserError

SUMMARY, HEARTBEAT = "summary.json", "heartbeat.json"
STALE_BEATS, STALE_MIN_S = 5, 300.0  # a remote heartbeat older than both is a stopped run
_written: dict[str, int] = {}  # summaries this process wrote (path -> mtime_ns): an earlier run's
_begun: set[str] = set()  # run directories whose launch this process (rank 0) accepted


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _process_start() -> float:
    """When this process started (seconds since the epoch)."""
    import psutil

    return psutil.Process().create_time()


def _earlier(path: Path) -> bool:
    """Whether ``path`` was written before this attempt: before this process started, or by this
    process for an earlier run (tests and notebooks run several in one process)."""
    try:
        st = path.stat()
    except OSError:
        return True
    return st.st_mtime < _process_start() or _written.get(str(path)) == st.st_mtime_ns


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    path = Path(run_dir) / SUMMARY
    _write_json(path, summary)
    _written[str(path)] = path.stat().st_mtime_ns


def begin(run_dir: Path, step: int, steps: int) -> None:
    """Rank 0, once the launch is accepted: the attempt before it is over (its summary goes; a
    failure record another rank of this attempt already wrote stays), and the first heartbeat."""
    path = Path(run_dir) / SUMMARY
    if path.exists() and _earlier(path):
        path.unlink(missing_ok=True)
    _begun.add(str(Path(run_dir).resolve()))
    beat(run_dir, step, steps)


def starting(run_dir: Path) -> None:
    """A run (an attempt) starts in this process: not accepted until ``begin``."""
    _begun.discard(str(Path(run_dir).resolve()))


def begun(run_dir: Path) -> bool:
    """Whether this process accepted a launch in ``run_dir`` (and may write its records)."""
    return str(Path(run_dir).resolve()) in _begun


def beat(run_dir: Path, step: int, steps: int) -> None:
    """Rank 0, on log steps: the run is alive at ``step``."""
    path = Path(run_dir) / HEARTBEAT
    last = _read_json(path) or {}
    now = time.time()
    same = last.get("pid") == os.getpid() and last.get("host") == socket.gethostname()
    _write_json(
        path,
        {
            "time": now,
            "step": step,
            "steps": steps,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "every_s": round(now - last["time"], 3) if same and "time" in last else None,
        },
    )


def record_failure(
    run_dir: Path, exc: BaseException, rank: int, step: int | None, steps: int, extra: dict | None = None
) -> bool:
    """Any rank whose run raised: ``summary.json`` says failed, with the step reached and the error,
    unless another rank of this attempt recorded its failure first. Returns whether it wrote."""
    path = Path(run_dir) / SUMMARY
    if isinstance(exc, KeyboardInterrupt | SystemExit):  # aborted by hand: told as stopped
        return False
    if not path.parent.is_dir():  # refused before the launch was accepted: nothing is written
        return False
    have = _read_json(path)
    if have is not None and have.get("status") == "failed" and not _earlier(path):
        return False
    write_summary(
        run_dir,
        {
            **(extra or {}),
            "status": "failed",
            "step": step,
            "steps": steps,
            "error": str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}",
            "error_type": type(exc).__name__,
            "rank": rank,
            "finished_at": time.time(),
        },
    )
    return True


def record_driver_failure(run_dir: Path, error: str, error_type: str, since: float, steps: int) -> None:
    """A driver (Ray's) whose workers failed: ``summary.json`` says so, unless a rank recorded its
    own failure after ``since`` (the launch's start); the step is the last heartbeat's."""
    run_dir = Path(run_dir)
    have = _read_json(run_dir / SUMMARY) or {}
    if have.get("status") == "failed" and have.get("finished_at", 0) >= since:
        return
    if not run_dir.is_dir():
        return
    hb = _read_json(run_dir / HEARTBEAT) or {}
    step = hb.get("step") if hb.get("time", 0) >= since else None
    write_summary(
        run_dir,
        {
            "status": "failed",
            "step": step,
            "steps": steps,
            "error": error,
            "error_type": error_type,
            "rank": None,
            "finished_at": time.time(),
        },
    )


# ------------------------------------------------------------------------------------- reading
def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def slurm_state(job_id: str) -> str | None:
    for cmd in (
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-j", job_id, "-o", "State"],
    ):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        state = proc.stdout.strip().split()
        if proc.returncode == 0 and state:
            return state[0]
    return None


def _alive(hb: dict[str, Any]) -> bool:
    """Whether the heartbeat's process still runs: asked of this machine for its own processes,
    else judged by the heartbeat's age against its beat."""
    if hb.get("host") == socket.gethostname():
        import psutil

        try:
            p = psutil.Process(int(hb["pid"]))
            return p.status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, KeyError, ValueError):
            return False
    every = hb.get("every_s") or 0.0
    return time.time() - hb.get("time", 0.0) < max(STALE_MIN_S, STALE_BEATS * every)


_ENDED = {"completed": "completed", "preempted": "preempted", "failed": "failed", "interrupted": "stopped"}


def _progress(run_dir: Path, summary: dict | None, hb: dict | None, records: list[dict]) -> tuple[int, Any]:
    """(the step reached, the steps planned) by the summary, heartbeat, metrics and config."""
    steps = (summary or hb or {}).get("steps")
    if steps is None and (run_dir / "config.yaml").is_file():
        import yaml

        steps = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("train") or {}).get("steps")
    step = max([r.get("step", 0) for r in records] + [(hb or {}).get("step", 0)], default=0)
    if summary and "step" in summary:
        step = summary["step"]
    return step, steps


def _state(
    sstate: str | None,
    started: bool,
    last_exit: dict | None,
    current: bool,
    ended: str | None,
    hb: dict | None,
) -> str:
    """The run's state from its Slurm job's state, its job records, its summary and its heartbeat."""
    if sstate in ("RUNNING", "COMPLETING", "CONFIGURING"):
        return "running"
    if sstate in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return "preempted" if started and last_exit and last_exit.get("exit") == EXIT_PREEMPTED else "pending"
    if current:
        return _ENDED[ended]
    if last_exit and last_exit.get("exit") not in (0, EXIT_PREEMPTED) and last_exit.get("exit", 0) < 128:
        return "failed"  # (128 + N: killed by signal N, which no failure record follows)
    if hb:
        return "running" if _alive(hb) and not sstate else "stopped"
    return "stopped" if sstate else "unknown"


def _slurm_error(run_dir: Path, job: str) -> str | None:
    """The last error line of the Slurm job's log (distrain's own first), or None."""
    log = run_dir / "slurm" / f"slurm-{job}.out"
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    ours = [ln for ln in lines if "distrain: error:" in ln] or [ln for ln in lines if "error:" in ln]
    return ours[-1].strip() if ours else None


def status(run_dir: Path) -> dict[str, Any]:
    """What a run directory says about its run: state (running, completed, failed, preempted,
    stopped; pending for a queued Slurm job), step, newest checkpoint, restarts, error, the last
    heartbeat, the Slurm job and its state, the W&B run."""
    from distrain.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "slurm").is_dir():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml, no slurm/)")
    summary = _read_json(run_dir / SUMMARY)
    hb = _read_json(run_dir / HEARTBEAT)
    records = _jsonl(run_dir / "metrics.jsonl")
    step, steps = _progress(run_dir, summary, hb, records)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    jobs = _jsonl(run_dir / "slurm" / "jobs.jsonl")
    starts = [j for j in jobs if "start" in j]
    ends = [j for j in jobs if "exit" in j]
    job = starts[-1]["job_id"] if starts else None
    sstate = slurm_state(job) if job else None
    last_exit = ends[-1] if ends else None
    ended = summary.get("status") if summary else None
    # a heartbeat after the summary: a later attempt (a resume) is under way
    current = ended in _ENDED and not (hb and hb.get("time", 0) > summary.get("finished_at", 0) + 1)
    state = _state(sstate, bool(starts), last_exit, current, ended, hb)
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "state": state,
        "step": step,
        "steps": steps,
        "checkpoint": ckpts[0].name if ckpts else None,
        "restarts": max((j.get("restart", 0) for j in starts), default=0),
        "slurm_job": job,
        "slurm_state": sstate,
        "heartbeat": hb.get("time") if hb else None,
    }
    error = summary.get("error") if current and ended == "failed" else None
    if state == "failed" and not error and job:
        error = _slurm_error(run_dir, job)
    out["error"] = error
    out["error_type"] = summary.get("error_type") if current and ended == "failed" else None
    if state == "stopped" and ended == "interrupted" and current:
        out["reason"] = "interrupted (Ctrl-C)"
    elif state == "stopped":
        out["reason"] = "ended without a record (killed, or its node was lost)"
    wandb_dirs = sorted((run_dir / "wandb").glob("*run-*")) if (run_dir / "wandb").is_dir() else []
    out["wandb"] = str(wandb_dirs[-1]) if wandb_dirs else None
    return out


def print_status(info: dict[str, Any], stream=sys.stdout) -> None:
    rows = [
        ("state", info["state"] + (f": {info['reason']}" if info.get("reason") else "")),
        ("step", f"{info['step']} of {info['steps']}" if info["steps"] else str(info["step"])),
        ("checkpoint", info["checkpoint"] or "none"),
        ("restarts", str(info["restarts"])),
    ]
    if info.get("heartbeat"):
        age = time.time() - info["heartbeat"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["heartbeat"]))
        rows.append(("heartbeat", f"{when} ({age:.0f} s ago)"))
    if info["slurm_job"]:
        rows.append(("slurm job", f"{info['slurm_job']} ({info['slurm_state'] or 'not in squeue/sacct'})"))
    rows.append(("wandb", info["wandb"] or "none"))
    if info.get("error"):
        rows.append(("error", info["error"]))
    width = max(len(k) for k, _ in rows)
    stream.write(f"{info['run_dir']}\n")
    for k, v in rows:
        stream.write(f"  {k:<{width}}  {v}\n")
