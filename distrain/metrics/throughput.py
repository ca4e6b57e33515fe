"""Step timing and throughput: window clocks, phase laps, samples/tokens/FLOPs totals, rates and MFU.

- samples/s, tokens/s: job-wide over the window since the previous record; per device = / world size.
  Rates, MFU and the data-wait share count training time: eval and checkpoint time is split out.
- model FLOPs per step = global batch x ``ModelSpec.flops_per_sample``.
- MFU = model FLOP/s per device / peak FLOP/s per device (``metrics.peak``); None where the peak is
  unknown. HFU = MFU x 4/3 under activation checkpointing (the recomputed forward is a third of
  forward + backward).
- on a GPU the device phases (fwd_bwd, optim) are timed with CUDA events, since launches are
  asynchronous; the events are read only when a window is recorded, never in the step.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PHASES = ("data", "fwd_bwd", "optim", "eval", "checkpoint")
DEVICE_PHASES = ("fwd_bwd", "optim")  # timed with CUDA events on a GPU (launches are asynchronous)

TOTALS: dict[str, Any] = {
    "samples": 0,
    "tokens": 0,
    "flops": 0.0,
    "elapsed_s": 0.0,
    "data_wait_s": 0.0,
    "mfu_time_s": 0.0,  # seconds of windows that had an MFU
    "mfu_x_time": 0.0,  # sum of MFU x window seconds (the time-weighted mean's numerator)
}


class Throughput:
    """The clocks of a run and of each record window, the time per phase, and the work done.

    ``peak`` (FLOP/s per device) and ``peak_source`` are given to ``start`` by whoever found the
    peak; without a peak MFU is None. ``accounting`` off keeps the rates and data wait only."""

    def __init__(
        self,
        per_step_samples: int,
        tokens_per_sample: int | None,
        flops_per_sample: float,
        world_size: int,
        *,
        accounting: bool = True,
        hfu_factor: float = 1.0,
        cuda: bool = False,
    ):
        self.per_step_samples = per_step_samples
        self.per_step_tokens = per_step_samples * (tokens_per_sample or 0)
        self.flops_per_step = per_step_samples * flops_per_sample
        self.world = world_size
        self.accounting = accounting
        self.hfu_factor = hfu_factor
        self.cuda = cuda
        self.peak: float | None = None
        self.peak_source = "off"
        self.totals: dict[str, Any] = dict(TOTALS)
        self._events: list | None = None  # (phase or None for a mark, CUDA event), in order
        self._run_t0 = self._mark = time.perf_counter()
        self._elapsed_before = 0.0
        self.reset_window()

    # ---------------------------------------------------------------------------- clocks
    def start(self, peak: float | None = None, peak_source: str = "off") -> None:
        """Set-up is done: the peak FLOP/s found (``find_peak``), CUDA events from now on
        (accounting on a GPU), and the clocks restart."""
        self.peak, self.peak_source = peak, peak_source
        if self.accounting and self.cuda:
            self._events = []
        self.restart_clocks()

    def restart_clocks(self) -> None:
        """Training time starts now; the elapsed total carries on from the saved one."""
        self._elapsed_before = self.totals["elapsed_s"]
        self._run_t0 = time.perf_counter()
        self.reset_window()

    def reset_window(self) -> None:
        self.win_t0 = time.perf_counter()
        self.win_steps = 0
        self.win_phase = dict.fromkeys(PHASES, 0.0)

    def elapsed(self) -> float:
        """Training seconds of the run, earlier attempts of a resumed run included."""
        return self._elapsed_before + time.perf_counter() - self._run_t0

    def flush(self) -> None:
        """Bring the elapsed total up to date (before a record or a checkpoint)."""
        self.totals["elapsed_s"] = self.elapsed()

    # ---------------------------------------------------------------------------- phases
    def mark(self) -> None:
        """Start of a step: time until the next ``lap`` belongs to its phase."""
        self._mark = time.perf_counter()
        if self._events is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append((None, ev))

    def lap(self, phase: str) -> None:
        """The time since the previous mark or lap was spent in ``phase``."""
        now = time.perf_counter()
        self.win_phase[phase] += now - self._mark
        self._mark = now
        if self._events is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append((phase, ev))

    def step_done(self) -> None:
        self.win_steps += 1
        self.totals["samples"] += self.per_step_samples
        self.totals["tokens"] += self.per_step_tokens
        self.totals["flops"] += self.flops_per_step

    def _device_phases(self) -> None:
        """Replace the host times of the device phases by the CUDA events' (waits for the last one)."""
        if not self._events:
            return
        self._events[-1][1].synchronize()
        device = dict.fromkeys(DEVICE_PHASES, 0.0)
        for (_, start), (phase, end) in zip(self._events, self._events[1:], strict=False):
            if phase in device:
                device[phase] += start.elapsed_time(end) / 1000.0
        self.win_phase.update(device)
        self._events = []

    # --------------------------------------------------------------------------- records
    def window_keys(self) -> tuple[dict[str, Any], float]:
        """The window's rates, data wait and (accounting) phase times and MFU, with its wall seconds;
        adds the window's data wait and MFU to the totals. ``reset_window`` starts the next one."""
        wall = max(time.perf_counter() - self.win_t0, 1e-9)
        dt = max(wall - self.win_phase["eval"] - self.win_phase["checkpoint"], 1e-9)  # training time
        n, w = max(self.win_steps, 1), self.win_steps
        self.totals["data_wait_s"] += self.win_phase["data"]
        rec: dict[str, Any] = {
            "samples_per_s": w * self.per_step_samples / dt,
            "samples_per_s_per_device": w * self.per_step_samples / dt / self.world,
        }
        if self.per_step_tokens:
            rec["tokens_per_s"] = w * self.per_step_tokens / dt
            rec["tokens_per_s_per_device"] = w * self.per_step_tokens / dt / self.world
        rec["elapsed_s"] = self.totals["elapsed_s"]
        rec["data_wait_s"] = self.win_phase["data"] / n
        rec["data_wait_pct"] = 100.0 * self.win_phase["data"] / dt
        if self.accounting:
            self._device_phases()
            rec["step_time_s"] = dt / n
            for p in PHASES[1:]:
                rec[f"{p}_s"] = self.win_phase[p] / n
            rec.update(self._mfu_keys(dt))
        return rec, wall

    def _mfu_keys(self, dt: float) -> dict[str, Any]:
        """Achieved TFLOP/s per device, MFU and HFU over ``dt`` training seconds of the window."""
        achieved = self.win_steps * self.flops_per_step / dt / self.world
        mfu = achieved / self.peak if self.peak else None
        if mfu is not None:  # the run's mean MFU is weighted by training time
            self.totals["mfu_time_s"] += dt
            self.totals["mfu_x_time"] += mfu * dt
        return {
            "tflops_per_device": achieved / 1e12,
            "mfu": mfu,
            "hfu": None if mfu is None else mfu * self.hfu_factor,
        }

    def total_keys(self) -> dict[str, Any]:
        """The running totals of work a record carries."""
        out: dict[str, Any] = {"samples_total": self.totals["samples"]}
        if self.per_step_tokens:
            out["tokens_total"] = self.totals["tokens"]
        out["flops_total"] = self.totals["flops"]
        return out

    def summary(self) -> dict[str, Any]:
        """Run totals (all attempts of a resumed run) and the peak behind the mean MFU."""
        t = self.totals
        return {
            "samples_seen": t["samples"],
            "tokens_seen": t["tokens"],
            "flops": t["flops"],
            "elapsed_s": t["elapsed_s"],
            "data_wait_pct": 100.0 * t["data_wait_s"] / t["elapsed_s"] if t["elapsed_s"] else None,
            "mean_mfu": t["mfu_x_time"] / t["mfu_time_s"] if t["mfu_time_s"] else None,
            "peak_flops_per_device": self.peak,
            "peak_source": self.peak_source,
        }

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This meter's keys of a checkpoint's flat totals; a key missing keeps its default."""
        for k, default in TOTALS.items():
            self.totals[k] = type(default)(state.get(k, default))
