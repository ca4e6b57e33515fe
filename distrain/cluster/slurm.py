"""Slurm: ``distrain submit slurm`` renders ``slurm/job.sbatch`` for a config and submits it;
``distrain cluster wait-ray`` is the job's readiness wait (``distrain status`` is ``distrain.status``).

The job script runs Ray on the allocation (a head on the first node, a worker on every other node,
each ``ray start --block`` in its own ``srun --overlap`` step) and ``distrain launch ray`` from the
batch shell, or ``srun distrain train`` on one node. A preemption notice or the time limit makes the
run checkpoint on every rank and exit 75, and the job requeues itself (``cluster.slurm.max_requeues``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from distrain.config import Config, check_topology, to_yaml
from distrain.errors import ConfigError, UserError

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch"
DEFAULT_NODE_IP = "$(hostname -I | cut -d' ' -f1)"


class SlurmError(UserError):
    """sbatch, squeue or the job script refused something; the message says what."""


def job_config(cfg: Config) -> tuple[Config, str]:
    """The config the job runs (its cluster section sized to the allocation) and the launcher."""
    s = cfg.cluster.slurm
    launcher = s.launcher if s.launcher != "auto" else ("ray" if s.nodes > 1 else "train")
    if launcher == "train" and s.nodes > 1:
        raise ConfigError(
            f"cluster.slurm.launcher=train runs on one node, but cluster.slurm.nodes={s.nodes}; "
            "set cluster.slurm.launcher=ray (or auto) for several nodes"
        )
    per_node = max(1, s.gpus_per_node)
    if launcher == "train":
        workers = per_node
        cluster = {"workers": workers}
    else:
        workers = s.nodes * per_node
        cluster = {
            "workers": workers,
            "gpus_per_worker": 1 if s.gpus_per_node else 0,
            "cpus_per_worker": max(1, s.cpus_per_task // per_node),
            "placement": "STRICT_SPREAD" if per_node == 1 and s.nodes > 1 else "PACK",
        }
    check_topology(cfg, workers)
    run = {"dir": str(cfg.run.run_dir.resolve())}
    cfg = cfg.model_copy(
        update={
            "cluster": cfg.cluster.model_copy(update=cluster),
            "run": cfg.run.model_copy(update=run),
        }
    )
    return cfg, launcher


def render(cfg: Config, launcher: str, workdir: Path, config_path: Path, template: Path = TEMPLATE) -> str:
    """The job script for ``cfg`` (``config_path``: where its resolved config will be)."""
    if not template.is_file():
        raise ConfigError(
            f"the Slurm job template {template} is missing: reinstall distrain from its source tree"
        )
    s = cfg.cluster.slurm
    sbatch = []
    if s.gpus_per_node:
        sbatch.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value:
            sbatch.append(f"--{key}={value}")
    for line in s.sbatch:
        line = line.strip()
        if not line.startswith("-"):
            raise ConfigError(
                f"cluster.slurm.sbatch: {line!r} is not an sbatch option; write options such as '--mem=0'"
            )
        sbatch.append(line)
    run_dir = cfg.run.run_dir
    fields = {
        "job_name": cfg.run.name,
        "nodes": str(s.nodes),
        "cpus_per_task": str(s.cpus_per_task),
        "time": s.time,
        "run_dir": str(run_dir),
        "signal_line": f"#SBATCH --signal=B:USR1@{s.grace_s}"
        if s.grace_s
        else "# (no --signal: cluster.slurm.grace_s=0)",
        "sbatch_lines": "\n".join(f"#SBATCH {x}" for x in sbatch),
        "run_dir_q": shlex.quote(str(run_dir)),
        "config_q": shlex.quote(str(config_path)),
        "launcher": launcher,
        "max_requeues": str(s.max_requeues),
        "gpus_per_node": str(s.gpus_per_node),
        "workers": str(cfg.cluster.workers),
        "ready_timeout_s": str(s.ready_timeout_s),
        "workdir_q": shlex.quote(str(workdir)),
        "setup_lines": "\n".join(s.setup),
        "node_ip": (s.ray_node_ip or DEFAULT_NODE_IP).replace("'", "'\\''"),
    }
    text = template.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        missing = text[text.index("{{") : text.index("}}", text.index("{{")) + 2]
        raise ConfigError(f"{template}: the field {missing} has no value")
    return text


def submit(cfg: Config, dry_run: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    """Check ``cfg``, render its job script and submit it; returns {script, job_id, ...}. With
    ``dry_run`` nothing is written or submitted."""
    from distrain.layout import preflight

    cfg, launcher = job_config(cfg)
    run_dir = cfg.run.run_dir
    s = cfg.cluster.slurm
    origin = f"cluster.slurm.nodes={s.nodes} x {max(1, s.gpus_per_node)} rank(s) a node"
    cfg, checks = preflight(cfg, [cfg.cluster.workers], origin)
    workdir = (workdir or Path.cwd()).resolve()
    slurm_dir = run_dir / "slurm"
    config_path = slurm_dir / "config.yaml"
    script = render(cfg, launcher, workdir, config_path)
    out = {
        "script": script,
        "launcher": launcher,
        "workers": cfg.cluster.workers,
        "run_dir": str(run_dir),
        "checks": checks,
        "config": cfg,
    }
    if dry_run:
        return out
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            "sbatch is not on PATH: submit from a Slurm login node (or install the Slurm client); "
            "`distrain submit slurm --dry-run` prints the job script without it"
        )
    created = not run_dir.exists()
    slurm_dir.mkdir(parents=True, exist_ok=True)  # sbatch's --output lives here
    config_path.write_text(to_yaml(cfg))
    script_path = slurm_dir / "job.sbatch"
    script_path.write_text(script)
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise SlurmError(f"sbatch refused the job:\n{proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    shutil.copy(script_path, slurm_dir / f"job-{job_id}.sbatch")
    out.update(job_id=job_id, log=str(slurm_dir / f"slurm-{job_id}.out"))
    return out


# ------------------------------------------------------------------------------------ readiness
def wait_ray(address: str, nodes: int, timeout: float, pids: list[int]) -> float:
    """Until ``nodes`` Ray nodes are alive at ``address``; fails at once when one of ``pids`` (the
    job's ``ray start`` steps) has died, and after ``timeout`` seconds. Returns the seconds waited."""
    import ray

    t0 = time.monotonic()
    connected = False
    alive = 0
    while time.monotonic() - t0 < timeout:
        dead = [p for p in pids if not _alive(p)]
        if dead:
            raise SlurmError(
                f"a Ray node's srun step (pid {dead[0]}) ended before the cluster was up; see its output above"
            )
        if not connected:
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                connected = True
            except Exception:  # noqa: BLE001 - the head is still starting
                time.sleep(1.0)
                continue
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive >= nodes:
            ray.shutdown()
            return time.monotonic() - t0
        time.sleep(1.0)
    raise SlurmError(
        f"{alive} of {nodes} Ray nodes joined {address} within {timeout:.0f} s "
        "(cluster.slurm.ready_timeout_s); see the nodes' output above"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (an exited child the shell has not reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------ port blocks
PORT_LOW, PORT_BLOCK, PORT_BLOCKS = 10000, 200, 100  # 10000-29999: below the ephemeral range


def port_blocks(job_id: str) -> list[int]:
    """The base ports of every block, in the order job ``job_id`` tries them: from a hash of the
    whole job id (two ids that agree modulo 100 start apart), then the blocks after it."""
    import hashlib

    first = int(hashlib.sha256(str(job_id).encode()).hexdigest(), 16) % PORT_BLOCKS
    return [PORT_LOW + ((first + i) % PORT_BLOCKS) * PORT_BLOCK for i in range(PORT_BLOCKS)]


def block_free(base: int) -> bool:
    """Whether every port of the block at ``base`` can be bound on this machine (any address)."""
    import socket

    for port in range(base, base + PORT_BLOCK):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return True


def free_block(job_id: str, after: int | None = None) -> int:
    """The first block of ``job_id``'s order (past ``after``) whose ports are all free here."""
    order = port_blocks(job_id)
    if after is not None:
        order = order[order.index(after) + 1 :] if after in order else order
    for base in order:
        if block_free(base):
            return base
    raise SlurmError(
        f"job {job_id}: no block of {PORT_BLOCK} free ports in {PORT_LOW}-{PORT_LOW + PORT_BLOCK * PORT_BLOCKS - 1} "
        "on this node; other jobs hold them all"
    )
