"""Ray Train runs the job: ``TorchTrainer`` starts the workers, sets up torch.distributed the way
torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR) and restarts the group after a worker
dies (``cluster.max_failures``). Every worker runs ``distrain.train.run``, the same function as
``distrain train``.

distrain's own checkpoints (``RUN_DIR/checkpoints``) are the state; after each save the workers
report a small Ray ``Checkpoint`` that points at it. After a restart, or when ``fit()`` is run again
for the same run directory, Ray hands that pointer back and the workers resume from the newest valid
checkpoint. Multi-node runs need ``run.dir`` on a file system every node shares.

Elastic jobs (``cluster.workers: {min, max}``) hand Ray Train the range: it starts once ``min``
workers fit, restarts the group smaller when a node is lost and larger when more workers fit. Each
size trains with the same global batch (``parallel.grad_accum`` derived in ``train.setup``) and
resumes exactly from the newest checkpoint (the universal conversion under ZeRO, the data cursor).
Before Ray resizes a running group (more workers fit, or a node is being drained) ``ResizeSaves``,
a callback in Ray's controller, asks the workers to save first, so the steps since the last
checkpoint are not lost; a node that dies without notice loses the steps since the last save.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from distrain.cluster.control import new_launch, write_notice
from distrain.config import Config, config_from_yaml, to_yaml
from distrain.errors import ConfigError, UserError
from distrain.notices import LAUNCH_ID, RESIZE

log = logging.getLogger(__name__)

POINTER = "distrain-checkpoint.json"

# Ray Train's private surface that elastic saves stand on (ray.train.v2._internal, no stable API):
# the controller callback's hook and the controller states it tells apart. Checked at import
# against the installed Ray; pyproject.toml bounds Ray to the minor version tested with them.
TESTED_RAY = "2.60"
CALLBACK = (
    "ray.train.v2._internal.execution.callback",
    "ControllerCallback",
    "after_controller_state_update",
)
STATES = (
    "ray.train.v2._internal.execution.controller.state",
    ("RunningState", "ResizingState", "PreemptingState"),
)


class RayVersionError(UserError):
    """The installed Ray lacks the part of Ray Train that distrain's elastic jobs use."""


def ray_surface(callback: tuple[str, str, str] = CALLBACK, states: tuple[str, tuple[str, ...]] = STATES):
    """(Ray Train's controller callback class, {state name: class}) from the installed Ray, or a
    RayVersionError naming what is missing and the Ray to install."""
    import importlib

    import ray

    module, name, hook = callback
    try:
        cls = getattr(importlib.import_module(module), name)
        getattr(cls, hook)
        found = {n: getattr(importlib.import_module(states[0]), n) for n in states[1]}
    except (ImportError, AttributeError) as exc:
        raise RayVersionError(
            f"the installed Ray {ray.__version__} lacks what distrain's elastic jobs use ({exc}): Ray Train's "
            f"{module}.{name}.{hook} and the controller states {', '.join(states[1])} of {states[0]}; distrain is "
            f"tested with Ray {TESTED_RAY}.x: pip install 'ray[train,data,default]=={TESTED_RAY}.*'"
        ) from None
    return cls, found


ControllerCallback, CONTROLLER_STATES = ray_surface()

# Ray Train's controller polls workers every 2 s by default; each report() waits for a poll
HEALTH_CHECK_S = "0.2"


def loopback_env(node_ip: str | None) -> dict[str, str]:
    """Environment that keeps a job on this machine's loopback: gloo on ``lo``, no cloud-metadata
    probes (a closed local proxy), no usage stats."""
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if node_ip and node_ip.startswith("127."):
        closed = "http://127.0.0.1:9"
        env.update(
            GLOO_SOCKET_IFNAME="lo",
            http_proxy=closed,
            https_proxy=closed,
            HTTP_PROXY=closed,
            HTTPS_PROXY=closed,
            no_proxy="127.0.0.1,localhost",
            NO_PROXY="127.0.0.1,localhost",
        )
    return env


def _worker_env(node_ip: str | None) -> dict[str, str]:
    env = loopback_env(node_ip)
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S
    )
    for key in (
        "TORCH_EXTENSIONS_DIR",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "WANDB_MODE",
        "TMPDIR",
        "ARROW_DEFAULT_MEMORY_POOL",  # distrain's choice (distrain/__init__.py) or the user's
        "DISTRAIN_LAUNCH_ID",  # the stop notices of this launch (distrain.cluster.control)
        "DISTRAIN_DEADLINE",
        "DISTRAIN_SLURM_JOB_ID",
        "DISTRAIN_SLURM_RESTART_COUNT",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class Resized(RuntimeError):
    """The worker group saved for Ray's resize and ends here; Ray restarts it at the new size."""


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the config from the driver, resume if Ray holds a checkpoint pointer."""
    import ray.train

    from distrain.train import run

    ctx = ray.train.get_context()
    cwd = config["cwd"]
    if not ray.get_runtime_context().runtime_env.get("working_dir") and cwd and os.path.isdir(cwd):
        # no uploaded working dir (a local or shared-file-system run): relative paths in the config
        # mean what they meant where the launch ran
        os.chdir(cwd)
    os.environ["DISTRAIN_NODE_ID"] = ray.get_runtime_context().get_node_id()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["gpus"] else "cpu")
    cfg = config_from_yaml(config["config"], "the launcher's config")
    pointer = ray.train.get_checkpoint()
    # a checkpoint of this launch that Ray was not told of (saved just before a resize): the launch
    # was accepted with no checkpoint in RUN_DIR, or as a resume
    saved_here = (cfg.run.run_dir / "checkpoints" / "latest").exists()
    if pointer is not None or saved_here:
        where = "a checkpoint saved before the resize"
        if pointer is not None:
            with pointer.as_directory() as d:
                where = f"Ray's pointer: step {json.loads((Path(d) / POINTER).read_text())['step']}"
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": True})})
        if ctx.get_world_rank() == 0:
            logging.getLogger("distrain.cluster").warning(
                "this run has a checkpoint (a restart, a resize or a new launch): resuming from the newest "
                "valid checkpoint on %d worker(s) (%s)",
                ctx.get_world_size(),
                where,
            )

    def report(step: int, path: Path) -> None:
        # every worker reports (Ray Train waits for all of them); rank 0 attaches the pointer
        if ctx.get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / POINTER).write_text(json.dumps({"step": step, "path": str(path)}))
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report({"step": step})

    summary = run(cfg, on_checkpoint=[report])
    if summary["status"] == RESIZE:  # an error, not a return: Ray would take a return as the job done
        raise Resized(f"checkpointed at step {summary['step']} for Ray's resize of the worker group")
    if summary["status"] not in ("completed", "preempted"):  # preempted: checkpointed, the driver exits 75
        raise RuntimeError(f"training stopped at step {summary['step']}: {summary['status']}")


def _resize_callback(run_dir: Path, launch: str, timeout_s: float):
    """Ray Train's controller callback that has a running worker group save before Ray resizes it."""
    running, resizing, draining = (CONTROLLER_STATES[n] for n in STATES[1])

    class ResizeSaves(ControllerCallback):
        """Runs in Ray's controller. When a running group is about to be resized (``ResizingState``:
        more workers fit) or a node is being drained (``PreemptingState``), write a resize notice;
        the trainer stops every rank at one step and saves. A resize waits for that checkpoint (Ray
        shuts the group down right after this hook); a drain does not (Ray keeps the group running
        until the workers end or the node's deadline)."""

        def __init__(self, run_dir: Path, launch: str, timeout_s: float):
            self.run_dir, self.launch, self.timeout_s = run_dir, launch, timeout_s

        def after_controller_state_update(self, previous_state, current_state):
            if not isinstance(previous_state, running) or not isinstance(current_state, resizing | draining):
                return
            latest = self.run_dir / "checkpoints" / "latest"
            was = latest.read_text() if latest.exists() else None
            t0 = time.time()
            write_notice(self.run_dir, self.launch, RESIZE)
            if isinstance(current_state, draining):
                log.warning("Ray: a node of the job is being drained; the workers save before it goes")
                return
            summary = self.run_dir / "summary.json"
            done_before = summary.stat().st_mtime if summary.exists() else None
            while time.time() - t0 < self.timeout_s:
                if latest.exists() and latest.read_text() != was:
                    log.warning(
                        "Ray resizes the worker group: saved %s first (%.1f s)",
                        latest.read_text(),
                        time.time() - t0,
                    )
                    return
                if summary.exists() and summary.stat().st_mtime != done_before:
                    return  # the workers ended (training done, or a failure Ray will see)
                time.sleep(0.2)
            log.warning(
                "Ray resizes the worker group: no checkpoint within %.0f s (cluster.resize_save_timeout_s); "
                "resizing anyway, from the last checkpoint",
                self.timeout_s,
            )

    return ResizeSaves(run_dir, launch, timeout_s)


def _start_ray(address: str | None, local: bool, cfg: Config, node_ip: str) -> None:
    import ray

    if ray.is_initialized():
        return
    env = _worker_env(node_ip if local else None)
    os.environ.update({k: v for k, v in env.items() if k != "GLOO_SOCKET_IFNAME"})
    if local:
        need = int(cfg.cluster.max_workers * cfg.cluster.cpus_per_worker + 0.999)
        ray.init(
            address="local",
            _node_ip_address=node_ip,
            num_cpus=max(os.cpu_count() or 1, need),
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )
    else:  # the workers get their environment from RunConfig.worker_runtime_env (a Ray Jobs driver
        # already has the job's runtime env, which ray.init may not redefine)
        ray.init(address=address, log_to_driver=True)


def _trainer(cfg: Config, run_dir: Path, host: str):
    """Ray Train's ``TorchTrainer`` of the run: ``cluster.workers`` workers (a range for an elastic
    job) running ``train_worker``, with the run's failure, checkpoint and resize settings."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    gpu = c.gpus_per_worker > 0
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if gpu else "gloo")
    resources = {"CPU": c.cpus_per_worker}
    if gpu:
        resources["GPU"] = c.gpus_per_worker
    workers = (c.min_workers, c.max_workers) if c.elastic else c.workers
    log.info(
        "Ray Train: %s worker(s), %s placement, %s CPU%s each, backend %s, max_failures %d",
        f"{c.min_workers}-{c.max_workers} (elastic)" if c.elastic else c.workers,
        c.placement,
        c.cpus_per_worker,
        f" + {c.gpus_per_worker} GPU" if gpu else "",
        backend,
        c.failures,
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": to_yaml(cfg), "gpus": gpu, "cwd": _launch_dir()},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpu,
            resources_per_worker=resources,
            placement_strategy=c.placement,
            elastic_resize_monitor_interval_s=c.resize_check_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=c.failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[_resize_callback(run_dir, os.environ[LAUNCH_ID], c.resize_save_timeout_s)]
            if c.elastic
            else None,
            worker_runtime_env={"env_vars": _worker_env(host)},
        ),
    )


def launch(cfg: Config, address: str | None = None, local: bool = False, node_ip: str = "127.0.0.2") -> dict:
    """Run ``cfg`` with ``cfg.cluster.workers`` Ray Train workers; returns the run's summary.json.
    ``local``: start a one-node Ray on this machine (bound to ``node_ip``); else join ``address``
    (or ``cluster.address``, or RAY_ADDRESS). Every check that can refuse the launch runs first
    (``distrain.layout.preflight``), before any Ray process starts or RUN_DIR/ray is written."""
    from distrain.layout import launch_sizes, preflight

    run_dir = cfg.run.run_dir.resolve()
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": str(run_dir)})})
    cfg, _ = preflight(cfg, *launch_sizes(cfg))
    if not os.environ.get(LAUNCH_ID):
        new_launch()
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if not local and not address:
        raise ConfigError(
            "no Ray cluster address: pass --address HOST:PORT, set cluster.address or RAY_ADDRESS "
            "(or use `distrain launch local` to start one on this machine)"
        )
    # read by Ray Train's controller, which the driver's environment reaches
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(cfg.cluster.start_timeout_s))
    _start_ray(address, local, cfg, node_ip)
    trainer = _trainer(cfg, run_dir, node_ip if local else _host_ip(address))
    since = time.time()
    try:
        trainer.fit()
    except Exception as exc:  # every rank died, or Ray gave up: the record says failed
        from distrain.status import record_driver_failure

        first = (worker_failures(exc) or [f"{type(exc).__name__}: {exc}"])[0].splitlines()[0]
        base = next(iter((getattr(exc, "worker_failures", None) or {}).values()), exc)
        kind = type(getattr(base, "_base_exc", base)).__name__
        record_driver_failure(run_dir, first, kind, since, cfg.train.steps)
        raise
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {"status": "unknown"}


def _launch_dir() -> str | None:
    """This process's working directory (not $PWD, which `subprocess(cwd=...)` and `os.chdir` leave
    stale); None where it no longer exists (a Ray Jobs driver can outlive its unpacked directory,
    and then its workers run in the uploaded working_dir anyway)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def _host_ip(address: str | None) -> str | None:
    if not address or address == "auto":
        return None
    host = address.split("://")[-1].rsplit(":", 1)[0]
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def worker_failures(exc: BaseException) -> list[str]:
    """What to print per failed rank from Ray Train's error (``WorkerGroupError.worker_failures``):
    one line for a user error (its message names the key, file or row), the worker's traceback for
    anything else."""
    from distrain.errors import UserError

    failures = getattr(exc, "worker_failures", None)
    if not failures:
        cause = getattr(exc, "controller_failure", None)
        return [f"Ray Train failed: {cause or exc}"]
    lines = []
    for rank, err in sorted(failures.items()):
        base = getattr(err, "_base_exc", err)  # Ray Train keeps the worker's exception and traceback
        text = str(err).strip()
        if isinstance(base, UserError):
            lines.append(f"rank {rank}: {base}")
        else:
            lines.append(f"rank {rank}: {type(base).__name__}: {base}\n{text}")
    return lines
