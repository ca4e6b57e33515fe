"""Checkpoints that never lose a run.

Layout under RUN_DIR/checkpoints/:

    stepNNNNNNNN/                 one checkpoint
      <part>/mp_rank_*, zero_*    DeepSpeed's shards of each part's engine (model, optimizer,
                                  scheduler): model/ for most models, generator/ and
                                  discriminator/ for a GAN
      distrain-state.pt           trainer state, resolved config (rank 0)
      rank-NNNNN.pt               each rank's data position and RNG states
      manifest.json               every file above with its size and sha256; written last
    latest                        the tag of the newest complete checkpoint; changed last

A save goes to ``.tmp-stepNNNNNNNN/``; when every rank has written, rank 0 hashes the files into
the manifest, syncs them and renames the directory into place, then points ``latest`` at it. A
crash at any moment leaves either the previous checkpoint as ``latest`` or the new one complete.
A load verifies sizes and hashes against the manifest before anything is unpickled (DeepSpeed's
shards are read by DeepSpeed's own loader) and falls back to the newest checkpoint that verifies.
distrain's own files are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrain.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "distrain-state.pt"
_TAG = re.compile(r"^step(\d{8,})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {
            k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in zip(("kind", "keys", "pos", "has_gauss", "gauss"), np.random.get_state(), strict=True)
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RandomState:
    """This rank's random streams (torch, CUDA, Python, NumPy) as a per-rank checkpointed part."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, saved: SavedRanks) -> None:
        """The saved streams of this rank; at another world size the streams seeded for this rank
        (run.seed + rank) go on (the old ranks' streams belong to other ranks)."""
        if saved.same_world:
            set_rng_state(saved.own())


class SavedRanks:
    """What a checkpoint holds for one per-rank part: this rank's own state (saved at the same
    world size), or every saved rank's, read on demand. The part decides what a new world size
    means for it."""

    def __init__(self, ckpt: Path, key: str, saved_world: int, rank: int, world: int, own: dict | None):
        self.ckpt, self.key, self.saved_world, self.rank, self.world = ckpt, key, saved_world, rank, world
        self._own = own

    @property
    def same_world(self) -> bool:
        return self.saved_world == self.world

    def own(self) -> dict[str, Any]:
        """This rank's saved state (same world size only)."""
        if not self.same_world or self._own is None:
            raise CheckpointError(
                f"{self.ckpt}: saved by {self.saved_world} ranks, this run has {self.world}: rank {self.rank} has no own '{self.key}' state"
            )
        return self._own[self.key]

    def all(self) -> list[dict[str, Any]]:
        """Every saved rank's state, in rank order (reads every rank's file: a world-size change only)."""
        files = [self.ckpt / f"rank-{r:05d}.pt" for r in range(self.saved_world)]
        return [torch.load(f, map_location="cpu", weights_only=True)[self.key] for f in files]


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories (a manifest present), newest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: step_of(p.name), reverse=True)


def refuse_to_overwrite(run_dir: Path, resume: bool) -> None:
    """A new run (``checkpoint.resume=false``) may not start in a directory that holds checkpoints."""
    if not resume and list_checkpoints(run_dir / "checkpoints"):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints and checkpoint.resume=false; pick another run.dir, or set checkpoint.resume=true to continue it"
        )


_verified: dict[str, tuple] = {}  # checkpoint -> the files' (name, size, mtime) when they last verified


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file of ``ckpt`` against its manifest; returns the manifest or raises CheckpointError.
    A checkpoint this process verified before is hashed again only if a file's size or time changed
    (a launcher's check and the load that follows it in one process read it once)."""
    mpath = ckpt / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from None
    try:
        seen = tuple(
            (rel, (ckpt / rel).stat().st_size, (ckpt / rel).stat().st_mtime_ns) for rel in manifest["files"]
        )
    except OSError:
        seen = None
    if seen is not None and _verified.get(str(ckpt)) == seen:
        return manifest
    for rel, meta in manifest["files"].items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(
                f"{f}: {size} bytes, the manifest says {meta['size']} (truncated or rewritten)"
            )
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from the manifest (altered or corrupt)")
    if seen is not None:
        _verified[str(ckpt)] = seen
    return manifest


def newest_valid(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; each one that does not is named in a warning."""
    for ckpt in list_checkpoints(root):
        try:
            return ckpt, verify(ckpt)
        except CheckpointError as exc:
            log.warning("checkpoint %s is not usable: %s; trying an older one", ckpt.name, exc)
    return None


def _touch(path: Path) -> None:
    path.write_bytes(b"")


def _host_copy(obj: Any, memo: dict[tuple, torch.Tensor] | None = None) -> Any:
    """A copy that shares no tensor storage with training (tensors copied to host memory); the same
    view of one storage (tied weights) is copied once, so the file is the one a direct save writes."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (
            obj.untyped_storage().data_ptr(),
            obj.storage_offset(),
            tuple(obj.shape),
            obj.stride(),
            obj.dtype,
        )
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, _host_copy(v, memo)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_host_copy(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = (_host_copy(v, memo) for v in obj)
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


class _Writer:
    """Runs write jobs inline, or in order on one background thread; a failure is reported (every
    rank logs it) at the next wait() and that checkpoint never gets a manifest."""

    def __init__(self, background: bool):
        self.background = background
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="distrain-checkpoint-writer", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                fn, args, always = job
                if self._error is None or always:  # after a failure the rest of that save is skipped
                    fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by wait()
                self._error = self._error or exc
            finally:
                self._jobs.task_done()

    def submit(self, fn, *args, always: bool = False) -> None:
        """Queue ``fn(*args)``; ``always``: run it even after an earlier job of the save failed."""
        if self.background:
            self._jobs.put((fn, args, always))
        else:
            fn(*args)

    @property
    def error(self) -> BaseException | None:
        """The failure of the save in progress (in the writer thread: of the jobs run so far)."""
        return self._error

    def wait(self) -> str | None:
        """Wait for the queued jobs; returns the failure of the save, if any, as text (and clears it)."""
        if self.background:
            self._jobs.join()
        if self._error is None:
            return None
        exc, self._error = self._error, None
        return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=60)
            self._thread = None


class _HostCopyEngine:
    """DeepSpeed's checkpoint engine of one part, as the ``Checkpointer`` hands it to DeepSpeed:
    each file's state is copied to host memory at once and written by the writer (inline when
    synchronous) with the engine DeepSpeed built from the ds_config (so the files are its own);
    loading and the rest are that engine's."""

    def __init__(self, base, writer: _Writer):
        self._base, self._writer = base, writer

    def save(self, state_dict, path: str) -> None:
        self._writer.submit(
            self._base.save, _host_copy(state_dict) if self._writer.background else state_dict, path
        )

    def __getattr__(self, name):
        return getattr(self._base, name)


def engine_dir(ckpt: Path, part: str) -> tuple[Path, str]:
    """(directory, tag) of one part's DeepSpeed shards in checkpoint ``ckpt``, as DeepSpeed's
    save and load take them: ``ckpt/<part>``; a checkpoint written before parts had subdirectories
    holds its one part (``model``) at its top."""
    if (ckpt / part).is_dir() or part != "model" or not any(ckpt.glob("mp_rank_*")):
        return ckpt, part
    return ckpt.parent, ckpt.name


def to_universal(ckpt: Path, parts: list[str] | tuple[str, ...] = ("model",)) -> Path:
    """Convert a verified ZeRO checkpoint into DeepSpeed's universal format (any world size), once
    for each part; written beside it as ``stepN-universal/<part>`` and marked complete last."""
    out = ckpt.parent / f"{ckpt.name}-universal"
    if (out / ".complete").exists():
        return out
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = ckpt.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    for part in parts:
        where, tag = engine_dir(ckpt, part)
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(where / tag),
                output_folder=str(tmp / part),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
    (tmp / ".complete").write_text(ckpt.name)
    os.rename(tmp, out)
    _fsync_dir(ckpt.parent)
    return out


def _changes(ckpt: Path, cfg) -> list[str]:
    """The keys where ``cfg`` changes what checkpoint ``ckpt`` holds (its saved config)."""
    from distrain.config import resume_changes

    saved = torch.load(ckpt / STATE, map_location="cpu", weights_only=True).get("config")
    return resume_changes(saved, cfg) if saved else []


def _refuse_changes(ckpt: Path, changes: list[str]) -> None:
    if changes:
        from distrain.errors import ConfigError

        raise ConfigError(
            f"{ckpt} was saved with another config; a resume may not change: "
            + "; ".join(changes)
            + ". Resume with the run's own config (`distrain resume RUN_DIR`, overriding only the keys "
            "docs/checkpoints.md lists as resumable), or start a new run in another run.dir"
        )


def check_launch(run_dir: Path, cfg) -> tuple[Any, dict[str, Any] | None]:
    """A launcher's check before any worker starts (or anything is written): a new run may not
    reuse a directory with checkpoints, and a resume may not change what the newest one holds.
    Returns ``cfg``, with a resume's ``data.partitions`` (when unset) the one the run recorded, and
    the job-wide state of the checkpoint it resumes from (None for a new run)."""
    refuse_to_overwrite(run_dir, cfg.checkpoint.resume)
    found = newest_valid(run_dir / "checkpoints") if cfg.checkpoint.resume else None
    if found is None:
        return cfg, None
    state = torch.load(found[0] / STATE, map_location="cpu", weights_only=True)
    saved = state.get("config")
    if not saved:
        return cfg, state
    import yaml

    from distrain.config import resume_changes

    recorded = (yaml.safe_load(saved).get("data") or {}).get("partitions")
    if cfg.data.partitions is None and recorded is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"partitions": recorded})})
    _refuse_changes(found[0], resume_changes(saved, cfg))
    return cfg, state


def resume_plan(root: Path, comm, cfg=None) -> dict[str, Any] | None:
    """Which checkpoint a run resumes from (rank 0 decides for all, collective over ``comm``): its
    tag, the world size that saved it, and, when that differs under ZeRO >= 1, the universal copy
    to load instead. With ``cfg``, a config that changes what the checkpoint holds (the model, its
    precision, ZeRO stage, optimizer...) is refused before anything loads, naming each key."""
    info: dict[str, Any] | None = None
    rank, world = comm.rank, comm.world_size
    if rank == 0:
        found = newest_valid(root)
        if found is not None:
            ckpt, manifest = found
            info = {
                "tag": ckpt.name,
                "world": manifest["world_size"],
                "zero_stage": manifest["zero_stage"],
                "parts": manifest.get("parts", ["model"]),
            }
            if cfg is not None:
                info["changes"] = _changes(ckpt, cfg)
    plan = comm.broadcast(info, src=0)
    if plan is not None:  # every rank raises the same error
        _refuse_changes(root / plan["tag"], plan.pop("changes", None) or [])
    if plan is not None and plan["world"] != world and plan["zero_stage"] > 0:
        if rank == 0:
            log.warning(
                "%s was saved by %d workers and this run has %d: converting it to a universal checkpoint",
                plan["tag"],
                plan["world"],
                world,
            )
            to_universal(root / plan["tag"], plan["parts"])
        comm.barrier()
        plan["universal"] = f"{plan['tag']}-universal"
    return plan


class Checkpointer:
    """Saves and restores one run's checkpoints; every rank calls save() and load() together.

    Besides DeepSpeed's engine shards it saves two sets of parts with ``state_dict()`` and
    ``load_state_dict()`` under fixed keys: ``job`` parts, the same on every rank and written once
    by rank 0 (trainer progress, meters, tracker), and ``rank`` parts, one file per rank (data
    position, random streams), which are handed a ``SavedRanks`` on load."""

    def __init__(
        self, cfg, engines: dict[str, Any], comm, run_dir: Path, job: dict[str, Any], rank: dict[str, Any]
    ):
        self.full_cfg = cfg
        self.cfg, self.engines, self.comm = cfg.checkpoint, dict(engines), comm
        self.job_parts, self.rank_parts = dict(job), dict(rank)
        self.root = run_dir / "checkpoints"
        self.rank, self.world = comm.rank, comm.world_size
        self.saves = 0  # saves made by this run (the same count on every rank)
        self._last_save = time.monotonic()
        self.writer = _Writer(background=cfg.checkpoint.async_save)
        self.last_blocking_s = 0.0
        # DeepSpeed builds its checkpoint engine inside the engine's constructor, from the ds_config
        # only (torch.save, or its own writers, which need its C++ I/O ops and write other bytes);
        # neither ``deepspeed.initialize`` nor ``save_checkpoint`` takes one. So each part's is
        # wrapped here, once, when the checkpointer that owns the writer is built, and stays for
        # the run: every file DeepSpeed saves goes through the writer's queue, in order with this
        # checkpointer's own files.
        for engine in self.engines.values():
            engine.checkpoint_engine = _HostCopyEngine(engine.checkpoint_engine, self.writer)

    # -------------------------------------------------------------------------------- when
    def due(self, step: int, last: bool, clock: float = 0.0) -> bool:
        """Whether this step saves; ``clock``: the agreed every_minutes flag (``clock_flag``)."""
        c = self.cfg
        if last and c.at_end:
            return True
        if c.every_steps > 0 and step % c.every_steps == 0:
            return True
        return clock > self.saves

    def clock_flag(self) -> float:
        """Rank 0's clock decides every_minutes for everyone, through the trainer's per-step
        agreement: while a save is due by the clock rank 0 asks for save number ``saves + 1``, and
        every other rank for none (0). A request agreed after a save it asked for is already met, so
        the agreement's one step of lag never saves twice."""
        minutes = self.cfg.every_minutes
        if self.rank != 0 or minutes <= 0 or time.monotonic() - self._last_save < 60 * minutes:
            return 0.0
        return float(self.saves + 1)

    def _barrier(self) -> None:
        self.comm.barrier()

    # -------------------------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """Save this step. Synchronous, or with checkpoint.async: block only while the state is
        copied to host memory; files, manifest and ``latest`` are written by a background thread
        (a second save first waits for the one before)."""
        tag = f"step{step:08d}"
        final, tmp = self.root / tag, self.root / f".tmp-{tag}"
        self.settle()  # the previous save is complete; every rank learns of its failure on any rank
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save that died earlier
        self._barrier()
        t0 = time.perf_counter()
        for part, engine in self.engines.items():  # each part's shards under <tag>/<part>
            engine.save_checkpoint(str(tmp), tag=part, save_latest=False)
        own = {key: part.state_dict() for key, part in self.rank_parts.items()}
        self.writer.submit(torch.save, _host_copy(own), tmp / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            from distrain.config import to_yaml

            state = {key: part.state_dict() for key, part in self.job_parts.items()}
            state.update(world_size=self.world, config=to_yaml(self.full_cfg))
            self.writer.submit(torch.save, _host_copy(state), tmp / STATE)
        self.writer.submit(self._mark_written, tmp, always=True)
        if self.rank == 0:
            self.writer.submit(self._finalize, step, tmp, final)
        self.last_blocking_s = time.perf_counter() - t0
        if not self.writer.background:
            self._barrier()  # every rank's files are on disk when save() returns
        self._last_save = time.monotonic()
        self.saves += 1
        return final

    def _mark_written(self, tmp: Path) -> None:
        """This rank's last job of a save: ``.done-rank-R``, or ``.failed-rank-R`` with the error of
        the job that failed (so rank 0 stops waiting for this rank at once)."""
        error = self.writer.error
        if error is None:
            _touch(tmp / f".done-rank-{self.rank:05d}")
        else:
            (tmp / f".failed-rank-{self.rank:05d}").write_text(f"{type(error).__name__}: {error}")

    def settle(self) -> None:
        """Collective: wait for this rank's background writes; a save that failed on any rank is
        logged (rank 0, naming each rank and its error) and never becomes ``latest``."""
        failed = self.writer.wait()
        failures = [(r, e) for r, e in enumerate(self.comm.gather(failed)) if e]
        if failures:
            log.error(
                "a background checkpoint save failed and was not completed (the previous checkpoint stays "
                "latest): %s",
                "; ".join(f"rank {r}: {e}" for r, e in failures),
            )

    def _finalize(self, step: int, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank has written: manifest, sync, rename into place, ``latest``."""
        markers = [tmp / f".done-rank-{r:05d}" for r in range(self.world)]
        deadline = time.monotonic() + 3600
        while not all(m.exists() for m in markers):  # files, not collectives: safe off the main thread
            failed = sorted(tmp.glob(".failed-rank-*"))
            if failed:
                raise CheckpointError(
                    f"{tmp}: " + "; ".join(f"{f.name[8:]} failed: {f.read_text()}" for f in failed)
                )
            if time.monotonic() > deadline:
                raise CheckpointError(f"{tmp}: not every rank finished writing within an hour")
            time.sleep(0.05)
        for m in markers:
            m.unlink()
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {
            "step": step,
            "world_size": self.world,
            "zero_stage": self.full_cfg.parallel.zero_stage,
            "parts": list(self.engines),
            "created": time.time(),
            "files": files,
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # the same step saved again (e.g. at the end right after every_steps)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / "latest", final.name)
        self._retain()
        log.info("checkpoint saved: %s", final)

    def close(self) -> None:
        """Wait for a background save to finish (the end of a run, or before exiting on a signal)."""
        failed = self.writer.wait()  # local: also on a failing rank's way out (``settle`` is collective)
        if failed:
            log.error("a background checkpoint save failed and was not completed: %s", failed)
        self.writer.close()

    def _retain(self) -> None:
        keep_last, keep_every = self.cfg.keep_last, self.cfg.keep_every
        if keep_last <= 0:
            return
        ckpts = list_checkpoints(self.root)
        for i, ckpt in enumerate(ckpts):
            step = step_of(ckpt.name)
            if i < keep_last or (keep_every > 0 and step % keep_every == 0):
                continue
            try:
                shutil.rmtree(ckpt)
                shutil.rmtree(ckpt.parent / f"{ckpt.name}-universal", ignore_errors=True)
                log.info("retention: removed %s", ckpt)
            except OSError as exc:  # never fatal: the run goes on with one checkpoint too many
                log.warning("retention: could not remove %s: %s", ckpt, exc)

    # -------------------------------------------------------------------------------- load
    def load(self, plan: dict[str, Any]) -> None:
        """Restore the checkpoint ``resume_plan`` chose: the job-wide parts (the corpus check
        first, before the engine's shards are read), the engine, then the per-rank parts."""
        ckpt = self.root / plan["tag"]
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        for key, part in self.job_parts.items():
            if key in state:  # a part added after the checkpoint was written keeps its fresh state
                part.load_state_dict(state[key])
        tag = plan.get("universal", plan["tag"])
        saved = plan.get("parts", ["model"])
        if sorted(saved) != sorted(self.engines):
            raise CheckpointError(f"{ckpt} holds the parts {saved}; this model has {list(self.engines)}")
        for part, engine in self.engines.items():
            where, sub = engine_dir(self.root / tag, part)
            path, _ = engine.load_checkpoint(str(where), tag=sub, load_module_strict=True)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {where / sub}")
            sched = engine.lr_scheduler
            if sched is not None:  # the next step's lr from this run's schedule (train.steps may have grown),
                sched.step(sched.last_batch_iteration)  # not the one the optimizer's saved state holds
        own = None
        if plan["world"] == self.world:
            own = torch.load(ckpt / f"rank-{self.rank:05d}.pt", map_location="cpu", weights_only=True)
        for key, part in self.rank_parts.items():
            part.load_state_dict(SavedRanks(ckpt, key, plan["world"], self.rank, self.world, own))
        self._barrier()
        log.info("resumed from %s (saved at step %d)", self.root / tag, step_of(plan["tag"]))
