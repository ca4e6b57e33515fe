"""The training loop. It owns stepping, eval, logging cadence and stop signals; everything else is
handed to it already built."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

from distrain.config import Config, global_batch
from distrain.data import ERROR_KINDS, DataError, DataPipeline, to_device
from distrain.metrics import Meters
from distrain.models import get_spec
from distrain.parallel import DistInfo
from distrain.parallel.engine import channels_last
from distrain.tracking import Tracker

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine,
        data: DataPipeline,
        dist_info: DistInfo,
        tracker: Tracker,
        checkpointer=None,
    ):
        self.cfg, self.engine, self.data, self.dist, self.tracker = cfg, engine, data, dist_info, tracker
        self.comm = dist_info.comm
        # per step, every rank's stop request and rank 0's every_minutes clock, agreed in the background
        self.agreement = self.comm.agreement(2)
        self.checkpointer = checkpointer
        self.workers: list[dict[str, Any]] = []  # where every rank runs (set by distrain.train.setup)
        self.on_checkpoint: list = []  # callables (step, path), run on every rank after each save
        self.spec = get_spec(cfg.model.name)
        self.step = 0
        self.data_skipped = torch.zeros(len(ERROR_KINDS), dtype=torch.long)  # bad rows skipped, all ranks
        self.stop_reason: str | None = None
        self._eval_n: int | None = None  # eval micro-batches per rank, agreed at the first eval
        self.meters = Meters(
            cfg,
            dist_info,
            global_batch(cfg, dist_info.world_size),
            data.tokens_per_sample,
            self.spec.flops_per_sample(cfg),
        )
        self.pending_rng: dict[str, Any] | None = None
        self.float_dtype = (
            torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
        )
        self.channels_last = channels_last(cfg, dist_info.device)
        # DeepSpeed's ZeRO and mixed-precision optimizers report the global grad norm; a plain
        # torch optimizer (ZeRO 0, fp32/autocast) does not, so it is computed here on log steps
        self._own_grad_norm = not hasattr(engine.optimizer, "_global_grad_norm")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data_skipped": self.data_skipped.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.data_skipped = torch.tensor(state.get("data_skipped", [0] * len(ERROR_KINDS)), dtype=torch.long)

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

    _STOP_CODES = {None: 0.0, "interrupted": 1.0, "preempted": 2.0}

    def _agree(self) -> tuple[bool, float]:
        """(stop, the every_minutes save request), the same on every rank at this step boundary: a
        stop asked on any rank (preemption wins over an interrupt) and rank 0's checkpoint clock.
        Host values only: the GPU is not touched and the reduction overlaps the next step
        (``StepAgreement``)."""
        clock = self.checkpointer.clock_flag() if self.checkpointer is not None else 0.0
        stop, clock = self.agreement.exchange([self._STOP_CODES.get(self.stop_reason, 1.0), clock])
        if stop:
            self.stop_reason = {1: "interrupted", 2: "preempted"}[int(stop)]
        return bool(stop), clock

    def _loss_scale_keys(self) -> dict[str, Any]:
        """fp16's dynamic loss scaling: the scale now and the steps skipped on overflow."""
        if self.cfg.parallel.precision != "fp16":
            return {}
        e = self.engine
        scaler = getattr(e, "torch_autocast_z0_gradscaler", None)  # autocast without ZeRO: torch's
        scale = scaler.get_scale() if scaler is not None else e.optimizer.loss_scale
        return {"loss_scale": float(scale), "skipped_steps": int(e.skipped_steps)}

    def _mean_across_ranks(self, value: torch.Tensor) -> float:
        """Collective; copies ``value`` to the host (a GPU sync: log steps and eval only)."""
        return self.comm.mean(value.detach().double().cpu())

    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = to_device(batch, self.dist.device, self.channels_last)
        if self.float_dtype is not None and "images" in batch:  # DeepSpeed bf16/fp16 weights take that input
            batch["images"] = batch["images"].to(self.float_dtype)
        return batch

    def evaluate(self) -> float | None:
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

    def _evaluate(self) -> float | None:
        batches = self.data.eval_batches()
        if batches is None:
            return None
        batches = batches[: self._eval_count(batches)]
        self.engine.eval()
        total = torch.zeros((), device=self.dist.device)
        with torch.no_grad():
            for b in batches:
                total += self.spec.loss(self.engine, self._prepare(b)).detach().float()
        self.engine.train()
        return self._mean_across_ranks(total / len(batches))

    def train(self) -> dict[str, Any]:
        cfg, engine, meters = self.cfg, self.engine, self.meters
        steps, accum, log_every = cfg.train.steps, cfg.parallel.grad_accum, cfg.train.log_every
        meters.start(self.workers)
        it = iter(self.data.train_batches())
        if self.pending_rng is not None:  # a resumed run continues the saved random streams
            from distrain.checkpoint import set_rng_state

            set_rng_state(self.pending_rng)
            self.pending_rng = None
        engine.train()
        meters.restart_clocks()
        window_loss = torch.zeros((), device=self.dist.device)  # on the device: no copy per step
        window_skipped = torch.zeros(len(ERROR_KINDS), dtype=torch.long)
        last_eval = None
        while self.step < steps:
            log_step = (self.step + 1) % log_every == 0 or self.step + 1 == steps
            grad_norm = None
            meters.mark()
            for micro in range(accum):
                raw = next(it)
                meters.lap("data")
                errs = raw.get("data_errors")
                if errs is not None:
                    window_skipped += errs.reshape(-1, len(ERROR_KINDS)).sum(0)
                batch = self._prepare(raw)
                loss = self.spec.loss(engine, batch)
                engine.backward(loss)
                if micro == accum - 1:
                    lr = engine.optimizer.param_groups[0]["lr"]  # the lr this step applies
                    if log_step and self._own_grad_norm:
                        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                meters.lap("fwd_bwd")
                engine.step()
                meters.lap("optim")
                window_loss += loss.detach().float() / accum
            self.step += 1
            meters.step_done()
            stopping, clock = self._agree()
            last = self.step == steps or stopping
            eval_loss = None
            if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last:
                meters.mark()
                eval_loss = last_eval = self.evaluate()
                meters.lap("eval")
            record = None
            if self.step % log_every == 0 or last:
                gn = grad_norm if self._own_grad_norm else engine.get_global_grad_norm()
                n = max(meters.win_steps, 1)
                record = {
                    "step": self.step,
                    "loss": self._mean_across_ranks(window_loss / n),
                    "lr": float(lr),
                    "grad_norm": None if gn is None else float(gn),
                }
                record.update(self._loss_scale_keys())
                record.update(meters.record())
                self.data_skipped += self.comm.sum(window_skipped)
                record.update(
                    {
                        f"data_skipped_{k}": int(v)
                        for k, v in zip(ERROR_KINDS, self.data_skipped.tolist(), strict=True)
                    }
                )
                window_loss.zero_()
                window_skipped.zero_()
            if eval_loss is not None:
                if record is None:
                    record = {"step": self.step, "elapsed_s": meters.elapsed()}
                record["eval_loss"] = eval_loss
            if record is not None:
                self.tracker.log(record)
                self.tracker.progress(self.step, record.get("loss"), record.get("tokens_per_s"))
            else:
                self.tracker.progress(self.step)
            preempted = stopping and self.stop_reason == "preempted"
            if self.checkpointer is not None and (self.checkpointer.due(self.step, last, clock) or preempted):
                meters.mark()
                meters.flush()  # the checkpoint holds current totals (energy, time)
                path = self.checkpointer.save(self.step)
                meters.lap("checkpoint")
                for callback in self.on_checkpoint:
                    callback(self.step, path)
            if stopping:
                break
        self.agreement.close()  # no reduction is left in flight
        if self.checkpointer is not None:
            self.checkpointer.settle()  # a background save's failure on any rank is known to all
        meters.flush()
        summary = {
            "status": "completed" if self.step >= steps else (self.stop_reason or "stopped"),
            "step": self.step,
            "steps": steps,
            "final_eval_loss": last_eval,
        }
        summary.update(meters.summary())
        meters.close()
        return summary
