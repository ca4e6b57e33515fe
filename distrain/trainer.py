"""The training loop. It owns stepping, eval, logging cadence and stop signals; everything else is
handed to it already built."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from distrain.config import Config
from distrain.data import ERROR_KINDS, DataError, DataPipeline, to_device
from distrain.errors import UserError
from distrain.metrics import Meters
from distrain.models import Update, get_spec
from distrain.notices import StopWatch
from distrain.parallel import DistInfo
from distrain.parallel.engine import Frozen, channels_last, plain_torch_optimizer
from distrain.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """Training produced non-finite losses or gradients for too many consecutive steps."""


class Progress:
    """The trainer's checkpointed counters (job-wide): optimizer steps done, bad rows skipped on
    all ranks by kind, and steps skipped for a non-finite loss or gradient."""

    def __init__(self):
        self.step = 0
        self.data_skipped = torch.zeros(len(ERROR_KINDS), dtype=torch.long)
        self.nonfinite_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_skipped": self.data_skipped.tolist(),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.data_skipped = torch.tensor(state.get("data_skipped", [0] * len(ERROR_KINDS)), dtype=torch.long)
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))


class NonFiniteGuard:
    """``train.on_nonfinite``: a step whose loss or gradients are not finite updates nothing.

    DeepSpeed's mixed-precision and ZeRO optimizers detect it themselves (``engine.skipped_steps``,
    with gradient clipping on: ``parallel.grad_clip`` > 0). Where DeepSpeed steps a plain torch
    optimizer (ZeRO 0 in fp32 or bf16 autocast), that optimizer is built to skip it
    (``parallel.engine.SkipNonFinite``), and a step was skipped when the gradient norm it reports
    through the engine is not finite: counted on the device, so no step reads a value back to the
    host. Streaks are checked on log steps: with ``stop``, ``train.max_nonfinite_steps``
    consecutive skipped steps end the run naming the step and the ranks whose loss was not finite."""

    def __init__(self, cfg: Config, engine, comm, device: torch.device):
        self.mode, self.limit = cfg.train.on_nonfinite, cfg.train.max_nonfinite_steps
        self.engine, self.comm = engine, comm
        self.own = plain_torch_optimizer(cfg)
        # skipped steps in the window, the current and the longest streak, the window's step of the
        # last skip: on the device for the own path, host ints (DeepSpeed's counter) otherwise
        new = (lambda: torch.zeros((), dtype=torch.long, device=device)) if self.own else int
        self.skipped, self.streak, self.max_streak, self.last_bad, self.step_no = (new() for _ in range(5))
        self.bad_loss = torch.zeros((), dtype=torch.long, device=device)  # this rank's, in the window
        self._ds_skipped = int(getattr(engine, "skipped_steps", 0))

    def watch_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss (on the device): counted on this rank when it is not finite."""
        self.bad_loss += (~torch.isfinite(loss.detach())).long()

    def after_step(self) -> None:
        """Count the step: skipped or not (the optimizer's gradient norm, or DeepSpeed's counter),
        and the streak."""
        self.step_no += 1
        if self.own:  # on the device, in place
            norm = self.engine.get_global_grad_norm()
            bad = (~torch.isfinite(norm)).long()
            self.skipped += bad
            self.streak.add_(1).mul_(bad)
            torch.maximum(self.max_streak, self.streak, out=self.max_streak)
            self.last_bad.copy_(torch.where(bad > 0, self.step_no, self.last_bad))
            return
        now = int(getattr(self.engine, "skipped_steps", 0))  # a host counter DeepSpeed keeps
        bad, self._ds_skipped = int(now > self._ds_skipped), now
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.max_streak = max(self.max_streak, self.streak)
        self.last_bad = self.step_no if bad else self.last_bad

    def window(self, start_step: int) -> int:
        """Collective, on log steps: the steps skipped in the window (raises NonFiniteError when
        ``stop`` and a streak reached the limit), then a new window."""
        skipped, longest, last = (int(t) for t in (self.skipped, self.max_streak, self.last_bad))
        bad_ranks = [r for r, n in enumerate(self.comm.gather(int(self.bad_loss))) if n]
        self.bad_loss.zero_()
        if self.own:
            self.skipped.zero_()
            self.max_streak.copy_(self.streak)  # a streak that goes on counts in the next window
            self.step_no.zero_()
            self.last_bad.zero_()
        else:
            self.skipped, self.max_streak, self.step_no, self.last_bad = 0, self.streak, 0, 0
        if self.mode == "stop" and longest >= self.limit:
            where = f"non-finite loss on rank(s) {bad_ranks}" if bad_ranks else "non-finite gradients"
            raise NonFiniteError(
                f"train.on_nonfinite=stop: {longest} consecutive steps up to step {start_step + last} were "
                f"skipped ({where}); the weights are those before them. Lower optim.lr or raise "
                "optim.warmup_steps, keep parallel.grad_clip on, check the data there, or set "
                "train.on_nonfinite=skip to go on skipping such steps"
            )
        return skipped


class Trainer:
    """The loop over a model's parts: each ``Update`` of the model's step trains one part through
    its engine (optimizer, schedule, clipping, non-finite guard of its own) while the other parts
    take no gradient. A one-part model has one engine and one update."""

    def __init__(
        self,
        cfg: Config,
        engines: dict[str, Any],
        data: DataPipeline,
        dist_info: DistInfo,
        progress: Progress,
        meters: Meters,
        tracker: Tracker,
        checkpointer,
        on_checkpoint: list[Callable[[int, Any], None]] | tuple = (),
        model_state: Any = None,
        samples: Any = None,
        sequence: Any = None,
    ):
        self.cfg, self.engines, self.data, self.dist = cfg, dict(engines), data, dist_info
        self.progress, self.meters, self.tracker, self.checkpointer = progress, meters, tracker, checkpointer
        self.on_checkpoint = list(on_checkpoint)  # callables (step, path), run on every rank after each save
        self.model_state, self.samples = model_state, samples  # the model's own state; sample grids
        self.comm = dist_info.comm
        # per step, every rank's stop request and rank 0's every_minutes clock, agreed in the background
        self.agreement = self.comm.agreement(2)
        self.spec = get_spec(cfg.model.name)
        self.updates = self.spec.steps(cfg)
        self.eval_figures = self.spec.eval_figures(cfg)
        if sequence is not None:  # ``SequenceParallel``: its slice of each batch, the group's loss
            self.updates = (Update("model", sequence.loss),)
            self.eval_figures = lambda parts, batch, state: {"loss": sequence.loss(parts, batch, state)}
        self.stop_reason: str | None = None
        self.watch = StopWatch(cfg.run.run_dir) if dist_info.is_main else None
        self._eval_n: int | None = None  # eval micro-batches per rank, agreed at the first eval
        first = next(iter(self.engines.values()))
        self.float_dtype = (
            torch.bfloat16 if first.bfloat16_enabled() else torch.float16 if first.fp16_enabled() else None
        )
        self.channels_last = channels_last(cfg, dist_info.device)
        # DeepSpeed's ZeRO and mixed-precision optimizers and ``SkipNonFinite`` report the global
        # grad norm; a plain torch optimizer (ZeRO 0, fp16 autocast) does not, so it is computed here
        self._own_grad_norm = {
            k: not hasattr(e.optimizer, "_global_grad_norm") for k, e in self.engines.items()
        }
        self.guards = {
            k: NonFiniteGuard(cfg.for_part(k), e, self.comm, dist_info.device)
            for k, e in self.engines.items()
        }
        # what each update's loss calls: the part it updates through its engine, the others as
        # their modules (``Frozen``: no other engine's backward runs inside this one's)
        self._views = {
            u.part: {k: e if k == u.part else Frozen(e) for k, e in self.engines.items()}
            for u in self.updates
        }

    @property
    def engine(self):
        """The engine of a one-part model."""
        (engine,) = self.engines.values()
        return engine

    def key(self, name: str, part: str) -> str:
        """A metrics key of one update: ``name`` for a one-update model, else ``name_<part>``."""
        return name if len(self.updates) == 1 else f"{name}_{part}"

    @contextlib.contextmanager
    def _only(self, part: str):
        """While one part's update runs, the other parts' parameters take no gradient."""
        frozen = [
            p for k, e in self.engines.items() if k != part for p in e.module.parameters() if p.requires_grad
        ]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    @property
    def step(self) -> int:
        return self.progress.step

    # -------------------------------------------------------------- signals
    def request_stop(self, reason: str) -> None:
        """Finish the step in flight, then stop (called from a signal handler)."""
        self.stop_reason = reason

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # a worker thread (Ray Train runs the loop in one): its launcher owns the signals

        def on_sigint(signum, frame):
            if self.stop_reason is not None:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            log.warning(
                "interrupt: finishing step %d, then stopping (Ctrl-C again to abort at once)", self.step + 1
            )
            self.request_stop("interrupted")

        def on_preempt(signum, frame):
            log.warning(
                "%s: finishing step %d, saving a checkpoint, then stopping",
                signal.Signals(signum).name,
                self.step + 1,
            )
            self.request_stop("preempted")

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, on_preempt)  # schedulers' notice (Slurm --signal, Kubernetes, Ray)
        signal.signal(signal.SIGUSR1, on_preempt)

    _STOP_CODES = {None: 0.0, "interrupted": 1.0, "resize": 2.0, "preempted": 3.0}

    def _agree(self) -> tuple[bool, float]:
        """(stop, the every_minutes save request), the same on every rank at this step boundary: a
        stop asked on any rank (preemption wins over an interrupt) and rank 0's checkpoint clock.
        Host values only: the GPU is not touched and the reduction overlaps the next step
        (``StepAgreement``)."""
        clock = self.checkpointer.clock_flag()
        if self.watch is not None:
            self.watch.stepped()
            why = self.stop_reason is None and self.watch.check()
            if why:
                log.warning(
                    "%s: finishing step %d, saving a checkpoint on every rank, then stopping%s",
                    {
                        "preempted": "stop notice from the launcher",
                        "resize": "Ray is resizing the worker group",
                    }.get(why, "the job's time limit is near"),
                    self.step + 1,
                    f" (end in {self.watch.deadline - time.time():.0f} s)" if why == "time limit" else "",
                )
                self.request_stop("resize" if why == "resize" else "preempted")
        stop, clock = self.agreement.exchange([self._STOP_CODES.get(self.stop_reason, 1.0), clock])
        if stop:
            self.stop_reason = {1: "interrupted", 2: "resize", 3: "preempted"}[int(stop)]
        return bool(stop), clock

    # ----------------------------------------------------------------- eval
    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = to_device(batch, self.dist.device, self.channels_last)
        if self.float_dtype is not None and "images" in batch:  # DeepSpeed bf16/fp16 weights take that input
            batch["images"] = batch["images"].to(self.float_dtype)
        return batch

    def evaluate(self) -> dict[str, float] | None:
        # evaluation draws nothing from the training run's random streams (an extra eval before a
        # preemption checkpoint must not change what a resumed run does)
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate()

    def _eval_count(self, batches: list) -> int:
        """Collective, once: the eval micro-batches every rank runs, the fewest any rank holds (under
        ZeRO 3 each forward gathers parameters from every rank, so the counts must agree)."""
        if self._eval_n is None:
            counts = self.comm.gather(len(batches))
            if min(counts) == 0:
                d, mb = self.cfg.data, self.cfg.train.micro_batch_size
                raise DataError(
                    f"data.eval_path: {d.eval_path} gives no full micro-batch of train.micro_batch_size={mb} "
                    f"on rank(s) {[r for r, c in enumerate(counts) if c == 0]} of {len(counts)}; use a larger "
                    "eval set (or more files), a smaller train.micro_batch_size, or drop data.eval_path"
                )
            self._eval_n = min(counts)
        return self._eval_n

    def _evaluate(self) -> dict[str, float] | None:
        """Collective: the model's eval figures (its loss, or its own), means over every rank."""
        batches = self.data.eval_batches()
        if batches is None:
            return None
        batches = batches[: self._eval_count(batches)]
        for e in self.engines.values():
            e.eval()
        totals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for b in batches:
                for k, v in self.eval_figures(self.engines, self._prepare(b), self.model_state).items():
                    totals[k] = totals.get(k, 0) + v.detach().float()
        for e in self.engines.values():
            e.train()
        sums = self.comm.sum(torch.stack(list(totals.values())).div(len(batches)).double().cpu())  # eval only
        return {k: float(v) / self.dist.world_size for k, v in zip(totals, sums.reshape(-1), strict=True)}

    # ----------------------------------------------------------------- loop
    def _step(self, it, window: dict[str, Any], log_step: bool) -> None:
        """One optimizer step: each update of the model in turn, over the same
        ``parallel.grad_accum`` micro-batches; the losses, skipped rows and (on log steps) the lr
        and grad norm of each update accumulate in ``window``, on the device."""
        meters, accum = self.meters, self.cfg.parallel.grad_accum
        step_loss = torch.zeros(len(self.updates), device=self.dist.device)
        raws: list[dict[str, Any]] = []  # the micro-batches, read during the first update
        meters.mark()
        for u, update in enumerate(self.updates):
            engine, guard = self.engines[update.part], self.guards[update.part]
            with self._only(update.part):
                for micro in range(accum):
                    if u == 0:
                        raw = next(it)
                        meters.lap("data")
                        errs = raw.get("data_errors")
                        if errs is not None:
                            window["skipped_rows"] += errs.reshape(-1, len(ERROR_KINDS)).sum(0)
                        if len(self.updates) > 1:
                            raws.append(raw)
                    else:
                        raw = raws[micro]
                    loss = update.loss(self._views[update.part], self._prepare(raw), self.model_state)
                    guard.watch_loss(loss)
                    engine.backward(loss)
                    if micro == accum - 1:
                        self._last_backward(update.part, window, log_step)
                    meters.lap("fwd_bwd")
                    engine.step()
                    meters.lap("optim")
                    step_loss[u] += loss.detach().float() / accum
            guard.after_step()
        finite = torch.isfinite(step_loss)  # a step with a non-finite loss is not part of the mean
        window["loss"] += torch.where(finite, step_loss, 0.0)
        window["loss_steps"] += finite
        if self.model_state is not None:
            self.model_state.after_step()
        self.progress.step += 1
        meters.step_done()

    def _last_backward(self, part: str, window: dict[str, Any], log_step: bool) -> None:
        """After a part's last backward of the step: its lr and, on log steps, its gradient norm
        where its optimizer reports none."""
        engine = self.engines[part]
        window["lr"][part] = engine.optimizer.param_groups[0]["lr"]  # the lr this step applies
        if log_step and self._own_grad_norm[part]:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            window["grad_norm"][part] = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _record(self, window: dict[str, Any]) -> dict[str, Any]:
        """Collective: the metrics.jsonl record of the window that ends at this step."""
        meters, p, n = self.meters, self.progress, len(self.updates)
        p.nonfinite_steps += sum(g.window(p.step - meters.win_steps) for g in self.guards.values())
        sums = self.comm.sum(torch.cat([window["loss"], window["loss_steps"]]).double().cpu())
        record: dict[str, Any] = {"step": p.step}
        for u, update in enumerate(self.updates):
            part, steps = update.part, sums[n + u]
            gn = (
                window["grad_norm"].get(part)
                if self._own_grad_norm[part]
                else self.engines[part].get_global_grad_norm()
            )
            record[self.key("loss", part)] = float(sums[u] / steps) if steps else None
            record[self.key("lr", part)] = float(window["lr"].get(part, 0.0))
            record[self.key("grad_norm", part)] = None if gn is None else float(gn)
        record.update(
            nonfinite_steps=p.nonfinite_steps,
            world_size=self.dist.world_size,  # an elastic job's size changes between records
            grad_accum=self.cfg.parallel.grad_accum,
            time=time.time(),
        )
        record.update(self._loss_scale_keys())
        record.update(meters.record())
        p.data_skipped += self.comm.sum(window["skipped_rows"])
        record.update(
            {f"data_skipped_{k}": int(v) for k, v in zip(ERROR_KINDS, p.data_skipped.tolist(), strict=True)}
        )
        for key in ("loss", "loss_steps", "skipped_rows"):
            window[key].zero_()
        return record

    def _loss_scale_keys(self) -> dict[str, Any]:
        """fp16's dynamic loss scaling: the scale now and the steps skipped on overflow, per part."""
        if self.cfg.parallel.precision != "fp16":
            return {}
        out: dict[str, Any] = {}
        for part, e in self.engines.items():
            scaler = getattr(e, "torch_autocast_z0_gradscaler", None)  # autocast without ZeRO: torch's
            scale = scaler.get_scale() if scaler is not None else e.optimizer.loss_scale
            out[self.key("loss_scale", part)] = float(scale)
            out[self.key("skipped_steps", part)] = int(e.skipped_steps)
        return out

    def _checkpoint(self) -> None:
        meters = self.meters
        meters.mark()
        meters.flush()  # the checkpoint holds current totals (energy, time)
        t0 = time.monotonic()
        path = self.checkpointer.save(self.step)
        if self.watch is not None:
            self.watch.saved(time.monotonic() - t0)
        meters.lap("checkpoint")
        for callback in self.on_checkpoint:
            callback(self.step, path)

    def train(self) -> dict[str, Any]:
        cfg, meters, tracker = self.cfg, self.meters, self.tracker
        steps, log_every, eval_every = cfg.train.steps, cfg.train.log_every, cfg.train.eval_every
        it = iter(self.data.train_batches())
        for e in self.engines.values():
            e.train()
        meters.restart_clocks()
        n = len(self.updates)
        window = {
            "loss": torch.zeros(n, device=self.dist.device),  # per update, on the device: no copy per step
            "loss_steps": torch.zeros(n, device=self.dist.device),  # steps whose loss was finite
            "skipped_rows": torch.zeros(len(ERROR_KINDS), dtype=torch.long),
            "lr": {},
            "grad_norm": {},
        }
        last_eval = None
        while self.step < steps:
            self._step(it, window, log_step=(self.step + 1) % log_every == 0 or self.step + 1 == steps)
            stopping, clock = self._agree()
            last = self.step == steps or stopping
            figures: dict[str, Any] = {}
            if (eval_every and self.step % eval_every == 0) or (last and self.stop_reason != "resize"):
                meters.mark()
                figures = {f"eval_{k}": v for k, v in (self.evaluate() or {}).items()}
                if self.samples is not None:  # collective: every rank decodes, rank 0 writes the grid
                    figures.update(self.samples.write(self.engines, self.step))
                last_eval = figures.get("eval_loss", last_eval)
                meters.lap("eval")
            record = self._record(window) if self.step % log_every == 0 or last else None
            if figures:
                record = record or {"step": self.step, "elapsed_s": meters.elapsed()}
                record.update(figures)
            if record is not None:
                tracker.log(record)
                tracker.progress(self.step, record.get("loss"), record.get("tokens_per_s"))
            else:
                tracker.progress(self.step)
            if self.checkpointer.due(self.step, last, clock) or (
                stopping and self.stop_reason in ("preempted", "resize")
            ):
                self._checkpoint()
            if stopping:
                break
        return self._finish(steps, last_eval)

    def _finish(self, steps: int, last_eval: float | None) -> dict[str, Any]:
        self.agreement.close()  # no reduction is left in flight
        self.checkpointer.settle()  # a background save's failure on any rank is known to all
        self.meters.flush()
        summary = {
            "status": "completed" if self.step >= steps else (self.stop_reason or "stopped"),
            "step": self.step,
            "steps": steps,
            "final_eval_loss": last_eval,
            "nonfinite_steps": self.progress.nonfinite_steps,
        }
        summary.update(self.meters.summary())
        self.meters.close()
        return summary
