"""What a resize of an elastic Ray job costs, on a real two-node Ray cluster on loopback.

    python benchmarks/bench_elastic.py [--steps 300] [--stop term|kill] [--out DIR] [--json FILE] [KEY=VALUE ...]

A head node (127.0.0.2) and a worker node (127.0.0.3), one CPU each, from launch/ray-up.sh; the
tiny GPT config launched with ``cluster.workers={min: 1, max: 2}`` (one worker per node), a
checkpoint every 20 steps. Once it trains on two workers the worker node is stopped by its pid
(``--stop term``: ``ray start``'s own shutdown, which drains the node first, as launch/ray-down.sh
does; ``--stop kill``: SIGKILL to its process group, a node that dies without notice); once the job
trains on one worker the node is started again, and the job grows back and completes.

Reported per resize: seconds from the node's loss (or return) to the first step trained at the new
size, and the steps lost (trained before the resize and trained again after it). The records are
every metrics.jsonl line seen while the job ran (polled every 0.1 s), so steps that a resumed run
drops from the file are counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


class Watch:
    """Every metrics.jsonl record seen while a run goes on (a resumed run rewrites the file)."""

    def __init__(self, path: Path):
        self.path, self.seen, self.records = path, set(), []

    def poll(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        for ln in lines:
            if ln.strip() and ln not in self.seen:
                try:
                    rec = json.loads(ln)
                except ValueError:  # a line being written
                    continue
                self.seen.add(ln)
                if "world_size" in rec:  # a training record (the loss, or each part's)
                    self.records.append(rec)

    def wait(self, cond, proc, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll()
            hit = next((r for r in self.records if cond(r)), None)
            if hit is not None:
                return hit
            if proc.poll() is not None:
                raise RuntimeError(f"the job ended (rc {proc.returncode}) before {what}")
            time.sleep(0.1)
        raise TimeoutError(f"no {what} within {timeout:.0f} s")


def resume_times(log: str) -> list[float]:
    """Seconds each resumed worker group spent from its first log line about the checkpoint (the
    universal conversion, under ZeRO) to "resumed from" (the engine and data position loaded)."""
    import re

    # (pid, time, event) once: on one machine both nodes' log monitors echo a worker's lines
    stamps = dict.fromkeys(
        re.findall(
            r"pid=(\d+)[^)]*\)\S* (\d\d):(\d\d):(\d\d) (?:INFO|WARNING) distrain\.checkpoint: "
            r"(step\d+ was saved|resumed from)",
            log,
        )
    )
    out, start = [], None
    for _pid, h, m, sec, what in stamps:
        t = int(h) * 3600 + int(m) * 60 + int(sec)
        if what == "resumed from":
            if start is not None:
                out.append(float(t - start))
            start = None
        elif start is None:
            start = t
    return out


def drill(
    work: Path,
    steps: int,
    stop: str,
    env: dict[str, str],
    data: Path,
    extra: list[str],
    config: Path | None = None,
) -> dict:
    """Run the elastic job through a shrink and a grow; returns the timings, the records and paths."""
    config = Path(config or REPO / "configs" / "gpt-cpu-tiny.yaml")
    state = work / "nodes"
    port = _port()
    env = {
        **env,
        "RAY_STATE_DIR": str(state),
        "RAY_PORT": str(port),
        "RAY_NUM_CPUS": "1",
        "RAY_DASHBOARD": "0",
        "RAY_AUTH_MODE": "token",
    }
    up = lambda ip, role: subprocess.run(  # noqa: E731
        ["bash", str(REPO / "launch" / "ray-up.sh")],
        env={**env, "RAY_ROLE": role, "RAY_NODE_IP": ip, "RAY_HEAD": f"127.0.0.2:{port}"},
        check=True,
        capture_output=True,
        text=True,
        timeout=200,
    )
    run_dir = work / "run"
    log = open(work / "launch.log", "w")
    proc = None
    try:
        up("127.0.0.2", "head")
        up("127.0.0.3", "worker")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distrain.cli",
                "launch",
                "ray",
                str(config),
                "--address",
                f"127.0.0.2:{port}",
                "--workers",
                "1-2",
                f"run.dir={run_dir}",
                f"train.steps={steps}",
                "train.log_every=1",
                "train.eval_every=0",
                "optim.warmup_steps=0",
                "checkpoint.every_steps=20",
                "checkpoint.at_end=false",
                "cluster.resize_check_s=5",
                *(
                    [f"data.train_path={data}/pydoc/train-*.jsonl", f"data.eval_path={data}/pydoc/val.jsonl"]
                    if config.name == "gpt-cpu-tiny.yaml"
                    else [f"data.train_path={data}/digits/train", f"data.eval_path={data}/digits/val"]
                ),
                *extra,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        watch = Watch(run_dir / "metrics.jsonl")
        watch.wait(lambda r: r["world_size"] == 2 and r["step"] >= 25, proc, 400, "25 steps on 2 workers")
        before_loss = max(r["step"] for r in watch.records)
        t_loss = time.time()
        pid = int((state / "127.0.0.3.pid").read_text())
        if stop == "kill":
            os.killpg(pid, signal.SIGKILL)
            (state / "127.0.0.3.pid").unlink()
        else:
            subprocess.run(
                ["bash", str(REPO / "launch" / "ray-down.sh")],
                env={**env, "RAY_NODE_IP": "127.0.0.3"},
                check=True,
                capture_output=True,
                timeout=200,
            )
        small = watch.wait(lambda r: r["world_size"] == 1, proc, 400, "a step on 1 worker")
        seen_before_shrink = max(r["step"] for r in watch.records if r["time"] < small["time"])
        watch.wait(
            lambda r: r["world_size"] == 1 and r["step"] >= small["step"] + 10, proc, 400, "10 steps on 1"
        )
        t_back = time.time()
        up("127.0.0.3", "worker")
        big = watch.wait(
            lambda r: r["world_size"] == 2 and r["time"] > t_back, proc, 400, "a step on 2 again"
        )
        seen_before_grow = max(r["step"] for r in watch.records if r["time"] < big["time"])
        rc = proc.wait(timeout=900)
        watch.poll()
        log.flush()
        return {
            "resume_s": resume_times((work / "launch.log").read_text()),
            "rc": rc,
            "run_dir": str(run_dir),
            "stop": stop,
            "before_loss": before_loss,
            "loss_to_step_s": small["time"] - t_loss,
            "shrink_lost_steps": seen_before_shrink - (small["step"] - 1),
            "back_to_step_s": big["time"] - t_back,
            "grow_lost_steps": seen_before_grow - (big["step"] - 1),
            "records": watch.records,
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        log.close()
        subprocess.run(
            ["bash", str(REPO / "launch" / "ray-down.sh")], env=env, capture_output=True, timeout=300
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stop", choices=["term", "kill"], default="term")
    ap.add_argument("--out", default=None, help="keep the run here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write the figures and records to this file")
    ap.add_argument("--config", default=str(REPO / "configs" / "gpt-cpu-tiny.yaml"), help="the job's config")
    ap.add_argument("overrides", nargs="*", help="config overrides for the job (e.g. parallel.zero_stage=2)")
    args = ap.parse_args()
    from distrain.cluster.ray import loopback_env
    from distrain.data.prepare import prepare

    work = Path(args.out or tempfile.mkdtemp(prefix="dr-el-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        prepare(data)
    tmp = Path(tempfile.mkdtemp(prefix="dr-", dir="/tmp"))  # Ray's sockets: a short path
    env = {
        **os.environ,
        **loopback_env("127.0.0.2"),
        "RAY_TMPDIR": str(tmp),
        "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("RAY_ADDRESS", None)
    res = drill(work, args.steps, args.stop, env, data, args.overrides, Path(args.config))
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    print(
        "| stop | node lost -> next step | steps lost (shrink) | node back -> step on it | steps lost (grow) | rc |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {res['stop']} | {res['loss_to_step_s']:.1f} s | {res['shrink_lost_steps']} | {res['back_to_step_s']:.1f} s "
        f"| {res['grow_lost_steps']} | {res['rc']} |"
    )
    print(f"universal conversion and load per resume (s): {res['resume_s']}")


if __name__ == "__main__":
    main()
