"""The one entry every launcher ends in: config -> parts -> Trainer.train() -> close."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distrain.config import Config, to_yaml
from distrain.errors import UserError

if TYPE_CHECKING:
    from distrain.checkpoint import Checkpointer
    from distrain.data import DataPipeline
    from distrain.metrics import Meters
    from distrain.parallel import DistInfo
    from distrain.tracking import Tracker
    from distrain.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything one rank builds for a run, each part whole."""

    cfg: Config
    dist: DistInfo
    engines: dict[str, Any]  # part -> deepspeed.DeepSpeedEngine
    data: DataPipeline
    meters: Meters
    tracker: Tracker
    checkpointer: Checkpointer
    trainer: Trainer
    workers: list[dict[str, Any]]  # rank, host, node and GPU of every rank

    @property
    def engine(self):
        """The engine of a one-part model."""
        (engine,) = self.engines.values()
        return engine


def _workers(dist_info) -> list[dict[str, Any]]:
    """Where every rank runs: host name, node (the Ray node id under Ray, else the host) and GPU."""
    import os
    import socket

    from distrain.metrics.energy import gpu_uuid

    host = socket.gethostname()
    me = {
        "rank": dist_info.rank,
        "host": host,
        "node": os.environ.get("DISTRAIN_NODE_ID", host),
        "gpu": gpu_uuid(dist_info.device),
    }
    return dist_info.comm.gather(me)


def params_digest(engines: dict[str, Any] | Any) -> str:
    """sha256 of the parameters of every part on this rank (gathered in full under ZeRO 3);
    ``engines``: part -> engine, or one engine."""
    import contextlib
    import hashlib

    import deepspeed
    import torch

    engines = engines if isinstance(engines, dict) else {"model": engines}
    h = hashlib.sha256()
    for part, engine in engines.items():
        params = dict(engine.module.named_parameters())
        gather = (
            deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
            if engine.zero_optimization_stage() == 3
            else contextlib.nullcontext()
        )
        with gather:
            for name in sorted(params):
                t = params[name].detach().cpu().contiguous()
                h.update((name if len(engines) == 1 else f"{part}.{name}").encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _topology(
    cfg: Config, dist_info, workers: list[dict[str, Any]], parts: dict, flops: dict
) -> dict[str, Any]:
    """The job's shape as the tracker and the console report it (and each part's, for several)."""
    from distrain.config import global_batch

    topology = {
        "world_size": dist_info.world_size,
        "nodes": len({w["node"] for w in workers}),
        "device": dist_info.device.type,
        "backend": dist_info.backend,
        "zero_stage": cfg.parallel.zero_stage,
        "mesh": "dp {} x sp {} x tp {}".format(*dist_info.mesh),
        "data_parallel": dist_info.dp_size,
        "precision": cfg.parallel.precision,
        "grad_accum": cfg.parallel.grad_accum,
        "global_batch": global_batch(cfg, dist_info.world_size),
        "params": sum(p.numel() for m in parts.values() for p in m.parameters()),
        **slurm_job(),
    }
    if len(parts) > 1:
        topology.update({f"params_{k}": sum(p.numel() for p in m.parameters()) for k, m in parts.items()})
        topology.update({f"flops_per_sample_{k}": v for k, v in flops.items()})
    return topology


def slurm_job() -> dict[str, Any]:
    """The Slurm job this launch runs in and how many times it was requeued (none outside Slurm)."""
    job = os.environ.get("DISTRAIN_SLURM_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    restarts = os.environ.get("DISTRAIN_SLURM_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or 0
    return {"slurm_job_id": job, "slurm_restart_count": int(restarts)}


def _announce(cfg: Config, run_dir, dist_info, topology: dict[str, Any], wandb_where: str) -> None:
    log.info(
        "distrain: run %s | dir %s | world size %d on %d node(s), %s | device %s | model %s (%.2fM params) | ZeRO %d | %s | W&B %s",
        cfg.run.name,
        run_dir,
        dist_info.world_size,
        topology["nodes"],
        topology["mesh"],
        dist_info.device,
        cfg.model.name,
        topology["params"] / 1e6,
        cfg.parallel.zero_stage,
        cfg.parallel.precision,
        wandb_where,
    )


def _for_this_world(cfg: Config) -> Config:
    """``cfg`` for this process's world size (an elastic job's grad_accum, the data layout when no
    driver decided it), with the device chosen and logging set up."""
    from distrain.config import sized_for
    from distrain.parallel import check_device
    from distrain.tracking import setup_logging

    os.environ.setdefault("DS_ACCELERATOR", check_device(cfg))  # before anything imports DeepSpeed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = sized_for(cfg, world)  # an elastic job: grad_accum for this size
    if cfg.data.partitions is None:  # not launched by the CLI, which decides it in the driver
        from distrain.layout import decide

        cfg, _ = decide(cfg, [world], f"world size {world}")
    setup_logging(int(os.environ.get("RANK", "0")), cfg.run.log_level)  # the launcher's rank, as torchrun's
    return cfg


def _data(cfg: Config, dist_info):
    from distrain.data import DataPipeline

    on_cuda = dist_info.device.type == "cuda"
    pin = on_cuda if cfg.data.pin_memory is None else cfg.data.pin_memory and on_cuda
    # keyed by the data-parallel rank: the ranks of one sequence- or tensor-parallel group share a batch
    return DataPipeline(cfg, dist_info.dp_rank, dist_info.dp_size, pin_memory=pin)


def _model(cfg: Config, dist_info):
    """The model's parts, and its sequence-parallel wrapper (or None)."""
    import torch

    from distrain.models import build_parts

    parts = build_parts(cfg)  # seeded by run.seed: identical on every rank
    # dropout and latents differ per rank; the ranks of a tensor-parallel group, which compute
    # the same activations outside the split layers, draw the same
    torch.manual_seed(cfg.run.seed + dist_info.rank // cfg.parallel.tensor_parallel)
    if cfg.parallel.sequence_parallel == 1:
        return parts, None
    from distrain.parallel.sequence import SequenceParallel

    return parts, SequenceParallel(cfg, parts["model"])


def _engines(cfg: Config, parts: dict, dist_info, universal: bool) -> dict[str, Any]:
    """One engine per part, each with its own optimizer, schedule and clipping."""
    from distrain.parallel import build_engine

    return {
        name: build_engine(
            cfg.for_part(name), m, dist_info.world_size, dist_info.device, load_universal=universal
        )
        for name, m in parts.items()
    }


def _samples(cfg: Config, spec, dist_info, run_dir, tracker, data):
    """A generative model's sample grids (None for the others)."""
    if spec.generative is None:
        return None
    from distrain.samples import Samples

    return Samples(cfg, spec, dist_info, run_dir, tracker, data)


def _begin(cfg: Config, run_dir, progress) -> None:
    """Rank 0, the launch accepted: from here on the run directory is written."""
    from distrain import status

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    status.begin(run_dir, progress.step, cfg.train.steps)


def setup(cfg: Config, on_checkpoint: list | tuple = ()) -> Session:
    """Initialise torch.distributed and build every part of this rank whole, in dependency order:
    data, model and engine, then meters, tracker and checkpointer (which restores their state on a
    resume), then the trainer. ``on_checkpoint``: callables (step, path) run after each save."""
    from distrain.checkpoint import Checkpointer, RandomState, refuse_to_overwrite, resume_plan
    from distrain.config import global_batch
    from distrain.metrics import Meters
    from distrain.models import get_spec
    from distrain.parallel import init_distributed
    from distrain.tracking import Tracker
    from distrain.trainer import Progress, Trainer

    cfg = _for_this_world(cfg)
    dist_info = init_distributed(cfg)
    run_dir, spec = cfg.run.run_dir.resolve(), get_spec(cfg.model.name)
    data = _data(cfg, dist_info)
    parts, sequence = _model(cfg, dist_info)
    refuse_to_overwrite(run_dir, cfg.checkpoint.resume)
    plan = resume_plan(run_dir / "checkpoints", dist_info.comm, cfg) if cfg.checkpoint.resume else None
    engines = _engines(cfg, parts, dist_info, universal=bool(plan and "universal" in plan))
    workers, flops = _workers(dist_info), spec.flops_by_part(cfg)
    batch = global_batch(cfg, dist_info.world_size)
    meters = Meters(cfg, dist_info, batch, data.tokens_per_sample, sum(flops.values()))
    topology = _topology(cfg, dist_info, workers, parts, flops)
    tracker = Tracker(cfg, run_dir, dist_info.is_main, topology)
    progress = Progress()
    model_state = spec.state(cfg) if spec.state is not None else None
    job = {"corpus": data.corpus, "trainer": progress, "meters": meters, "tracker": tracker}
    job.update({"model_state": model_state} if model_state is not None else {})
    rank = {"data": data, "rng": RandomState()}
    checkpointer = Checkpointer(cfg, engines, dist_info.comm, run_dir, job=job, rank=rank)
    if plan:
        checkpointer.load(plan)
    if dist_info.is_main:
        _begin(cfg, run_dir, progress)
    meters.start(workers)  # collective: the peak FLOP/s probe, each node's energy reader
    tracker.start(progress.step)
    callbacks = [*([tracker.log_checkpoint] if cfg.tracking.wandb.log_checkpoints else []), *on_checkpoint]
    samples = _samples(cfg, spec, dist_info, run_dir, tracker, data)
    trainer = Trainer(
        cfg,
        engines,
        data,
        dist_info,
        progress,
        meters,
        tracker,
        checkpointer,
        callbacks,
        model_state,
        samples,
        sequence,
    )
    _announce(cfg, run_dir, dist_info, topology, tracker.wandb_where)
    return Session(cfg, dist_info, engines, data, meters, tracker, checkpointer, trainer, workers)


def _check_replicas(s: Session) -> dict[str, Any]:
    digest = params_digest(s.engines)
    digests = s.dist.comm.gather(digest)
    group = s.dist.mesh[2]  # a tensor-parallel rank holds its own shards; SP ranks hold whole replicas
    differ = [r for r, d in enumerate(digests) if d != digests[r % group]]
    if differ:
        of = "rank 0's" if group == 1 else f"their tensor-parallel rank's in ranks 0-{group - 1}"
        raise RuntimeError(
            f"train.check_replicas: the parameters of rank(s) {differ} differ from {of} after training"
        )
    return {"replicas_identical": True, "params_sha256": digest}


def _job_facts(s: Session, run_dir) -> dict[str, Any]:
    """What the run summary says of the job beside the trainer's figures."""
    facts: dict[str, Any] = slurm_job()
    if s.data.restarts:  # data.restart_order: a resume restarted the data order
        facts["data_restarts"] = s.data.restarts
    facts.update(
        run_dir=str(run_dir),
        world_size=s.dist.world_size,
        nodes=len({w["node"] for w in s.workers}),
        workers=s.workers,
        finished_at=time.time(),
    )
    return facts


def _record_end(cfg: Config, s: Session, run_dir, summary: dict[str, Any]) -> None:
    """Rank 0: the end-of-run record and line (none for a resize: the job goes on)."""
    from distrain import status

    if summary["status"] == "resize":  # the job goes on: no end-of-run record
        log.info(
            "run %s: checkpointed at step %d/%d for Ray's resize; the workers restart at the new size",
            cfg.run.name,
            summary["step"],
            summary["steps"],
        )
    else:
        status.write_summary(run_dir, summary)
        s.tracker.summary(summary)
        log.info(
            "run %s: %s at step %d/%d in %.1fs",
            cfg.run.name,
            summary["status"],
            summary["step"],
            summary["steps"],
            summary["elapsed_s"],
        )


def run(cfg: Config, session: Session | None = None, on_checkpoint: list | tuple = ()) -> dict[str, Any]:
    """Train per ``cfg`` in this process (one rank of the job); returns the run summary, which rank 0
    also writes to RUN_DIR/summary.json (a run's success is that record, not the exit path). Any
    exception, here or while the parts are built, is recorded there as a failure before it goes on.
    ``on_checkpoint``: as for ``setup``."""
    from distrain import status

    run_dir = cfg.run.run_dir.resolve()
    rank = int(os.environ.get("RANK", "0"))
    if session is None:
        status.starting(run_dir)
    try:
        s = session or setup(cfg, on_checkpoint)
    except BaseException as exc:  # a refusal before the launch was accepted writes nothing
        if not isinstance(exc, UserError) or status.begun(run_dir):
            status.record_failure(run_dir, exc, rank, None, cfg.train.steps)
        raise
    s.trainer.install_signal_handlers()
    summary: dict[str, Any] = {}
    try:
        summary = s.trainer.train()
        summary.update(_job_facts(s, run_dir))
        if cfg.train.check_replicas:
            summary.update(_check_replicas(s))
    except BaseException as exc:
        # training ended and a check after it failed: the record keeps what the run did
        done = {k: v for k, v in summary.items() if k not in ("status", "step", "steps")}
        status.record_failure(run_dir, exc, s.dist.rank, s.trainer.step, cfg.train.steps, done)
        s.tracker.abort()  # the W&B run ends marked failed; metrics.jsonl keeps what was logged
        raise
    finally:
        s.tracker.close()
        s.data.close()
        s.checkpointer.close()  # a background save finishes before the run is reported
    if s.dist.is_main:
        _record_end(cfg, s, run_dir, summary)
    return summary
