"""Throughput, MFU and energy accounting beside every step; totals that survive resume.

Formulas in one place:
- samples/s, tokens/s: job-wide over the window since the previous record; per device = / world size.
- model FLOPs per step = global batch x ``ModelSpec.flops_per_sample`` (forward + backward; PaLM's
  6N + 12·L·H·Q·T for gpt, FlopCounterMode for resnet and lstm).
- MFU = model FLOP/s per device / peak FLOP/s per device (``metrics.peak``); None where the peak is
  unknown. HFU also counts the forward recomputed by activation checkpointing (x 4/3: the forward is
  a third of forward + backward).
- energy: counters read at the edges of each window by one process per node (``metrics.energy``),
  summed over nodes; CO2e = kWh x PUE x grid g/kWh.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from distrain.metrics.energy import NodeEnergy, co2e_kg, open_node_energy
from distrain.metrics.peak import cpu_probe_flops, cuda_matmul_dtype, gpu_peak_flops

log = logging.getLogger(__name__)

PHASES = ("data", "fwd_bwd", "optim", "eval", "checkpoint")
_DEVICE_PHASES = ("fwd_bwd", "optim")  # timed with CUDA events on a GPU (launches are asynchronous)

_TOTALS = {
    "samples": 0,
    "tokens": 0,
    "flops": 0.0,
    "energy_j": 0.0,
    "elapsed_s": 0.0,
    "data_wait_s": 0.0,
    "mfu_time_s": 0.0,  # seconds of windows that had an MFU
    "mfu_x_time": 0.0,  # sum of MFU x window seconds (the time-weighted mean's numerator)
    "energy_estimated": False,
}


class Meters:
    def __init__(
        self,
        cfg,
        dist_info,
        per_step_samples: int,
        tokens_per_sample: int | None,
        flops_per_sample: float,
    ):
        self.cfg = cfg
        self.mcfg = cfg.metrics
        self.accounting = cfg.metrics.accounting
        self.dist = dist_info
        self.world = dist_info.world_size
        self.per_step_samples = per_step_samples
        self.per_step_tokens = per_step_samples * (tokens_per_sample or 0)
        self.flops_per_step = per_step_samples * flops_per_sample
        self.hfu_factor = 4.0 / 3.0 if cfg.parallel.activation_checkpointing else 1.0
        self.totals: dict[str, Any] = dict(_TOTALS)
        self.peak: float | None = None
        self.peak_source = "off"
        self.energy: NodeEnergy | None = None
        self.energy_source = "off"
        self._energy_read = 0.0  # this node's reader total at the previous flush
        self._cuda = dist_info.device.type == "cuda"
        self._events: list | None = None
        self._run_t0 = self._mark = time.perf_counter()
        self._elapsed_before = 0.0
        self._reset_window()

    # ----------------------------------------------------------------------------- set-up
    def start(self, workers: list[dict[str, Any]]) -> None:
        """Collective (every rank): peak FLOP/s, the energy reader of each node, the clocks.
        ``workers``: every rank's ``host`` and ``gpu`` (UUID or None), in rank order."""
        if self.accounting:
            self._find_peak()
            if self.mcfg.energy:
                self._open_energy(workers)
            if self._cuda:
                self._events = []
        self.restart_clocks()

    def restart_clocks(self) -> None:
        """Training time starts now (after set-up, probes and the first data iterator)."""
        self._elapsed_before = self.totals["elapsed_s"]
        self._run_t0 = time.perf_counter()
        self._reset_window()

    def _find_peak(self) -> None:
        if self.mcfg.peak_tflops is not None:
            self.peak, self.peak_source = self.mcfg.peak_tflops * 1e12, "metrics.peak_tflops"
        elif self._cuda:
            name = torch.cuda.get_device_name(self.dist.device)
            self.peak, self.peak_source = gpu_peak_flops(name, cuda_matmul_dtype(self.cfg.parallel.precision))
            if self.peak is None:
                log.warning(
                    "MFU is not reported: %s; set metrics.peak_tflops to this GPU's dense peak",
                    self.peak_source,
                )
        else:
            dtype = torch.bfloat16 if self.cfg.parallel.precision == "bf16" else torch.float32
            comm = self.dist.comm
            comm.barrier()  # every rank probes at once, as they will train
            probe = comm.mean(torch.tensor(cpu_probe_flops(dtype), dtype=torch.float64))
            self.peak, self.peak_source = probe, f"CPU matmul probe ({str(dtype)[6:]})"

    def _open_energy(self, workers: list[dict[str, Any]]) -> None:
        """The lowest rank on each host reads that host's devices (every rank's GPU on it)."""
        host = workers[self.dist.rank]["host"]
        on_host = [w for w in workers if w["host"] == host]
        if min(w["rank"] for w in on_host) == self.dist.rank:
            uuids = sorted({w["gpu"] for w in on_host if w["gpu"]})
            self.energy = open_node_energy(uuids, self._cpu_watts(), self.mcfg.power_sample_s)
        # every rank learns the job's label (the same wherever nodes are alike)
        label = [self.energy.source if self.energy else None, bool(self.energy and self.energy.estimated)]
        labels = self.dist.comm.gather(label)
        sources = sorted({src for src, _ in labels if src})
        self.energy_source = ",".join(sources)
        self.totals["energy_estimated"] = self.totals["energy_estimated"] or any(est for _, est in labels)

    def _cpu_watts(self) -> float:
        if self.mcfg.cpu_watts is not None:
            return self.mcfg.cpu_watts
        return 10.0 * (os.cpu_count() or 1)

    # ---------------------------------------------------------------------------- timing
    def _reset_window(self) -> None:
        self.win_t0 = time.perf_counter()
        self.win_steps = 0
        self.win_phase = dict.fromkeys(PHASES, 0.0)
        self.win_energy_j = 0.0
        self.win_energy_t0 = self.win_t0

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

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._run_t0

    # ------------------------------------------------------------------------- windows
    def flush(self) -> None:
        """Collective: close the energy window (synchronize, read, sum over nodes) into the totals.
        Called at every record and before every checkpoint, so saved totals are current."""
        self.totals["elapsed_s"] = self.elapsed()
        if self.energy_source == "off":
            return
        if self._cuda:
            torch.cuda.synchronize(self.dist.device)
        now = self.energy.read() if self.energy else 0.0
        joules = float(self.dist.comm.sum(torch.tensor(now - self._energy_read, dtype=torch.float64)))
        self._energy_read = now
        self.win_energy_j += joules
        self.totals["energy_j"] += joules

    def _device_phases(self) -> None:
        if not self._events:
            return
        self._events[-1][1].synchronize()
        device = dict.fromkeys(_DEVICE_PHASES, 0.0)
        for (_, start), (phase, end) in zip(self._events, self._events[1:], strict=False):
            if phase in device:
                device[phase] += start.elapsed_time(end) / 1000.0
        self.win_phase.update(device)
        self._events = []

    def record(self) -> dict[str, Any]:
        """Close the window: the accounting keys of a metrics.jsonl record (collective)."""
        self.flush()
        now = time.perf_counter()
        wall = max(now - self.win_t0, 1e-9)
        # rates, MFU and the data-wait share count training time: eval and checkpoint time is split out
        dt = max(wall - self.win_phase["eval"] - self.win_phase["checkpoint"], 1e-9)
        n = max(self.win_steps, 1)
        w = self.win_steps
        t = self.totals
        t["data_wait_s"] += self.win_phase["data"]
        rec: dict[str, Any] = {
            "samples_per_s": w * self.per_step_samples / dt,
            "samples_per_s_per_device": w * self.per_step_samples / dt / self.world,
        }
        if self.per_step_tokens:
            rec["tokens_per_s"] = w * self.per_step_tokens / dt
            rec["tokens_per_s_per_device"] = w * self.per_step_tokens / dt / self.world
        rec["elapsed_s"] = t["elapsed_s"]
        rec["data_wait_s"] = self.win_phase["data"] / n
        rec["data_wait_pct"] = 100.0 * self.win_phase["data"] / dt
        if self.accounting:
            self._device_phases()
            rec["step_time_s"] = dt / n
            for p in PHASES[1:]:
                rec[f"{p}_s"] = self.win_phase[p] / n
            achieved = w * self.flops_per_step / dt / self.world
            rec["tflops_per_device"] = achieved / 1e12
            mfu = achieved / self.peak if self.peak else None
            rec["mfu"] = mfu
            rec["hfu"] = None if mfu is None else mfu * self.hfu_factor
            if mfu is not None:  # time-weighted over training time
                t["mfu_time_s"] += dt
                t["mfu_x_time"] += mfu * dt
            if self.energy_source != "off":
                rec.update(self._energy_keys())
                rec["power_w"] = self.win_energy_j / wall
        rec["samples_total"] = t["samples"]
        if self.per_step_tokens:
            rec["tokens_total"] = t["tokens"]
        rec["flops_total"] = t["flops"]
        self._reset_window()
        return rec

    def _energy_keys(self) -> dict[str, Any]:
        t, m = self.totals, self.mcfg
        out = {
            "energy_j": t["energy_j"],
            "energy_kwh": t["energy_j"] / 3.6e6,
            "co2e_kg": co2e_kg(t["energy_j"], m.grid_g_per_kwh, m.pue),
            "j_per_sample": t["energy_j"] / t["samples"] if t["samples"] else None,
        }
        if self.per_step_tokens:
            out["j_per_token"] = t["energy_j"] / t["tokens"] if t["tokens"] else None
        out["energy_source"] = self.energy_source
        out["energy_estimated"] = bool(t["energy_estimated"])
        return out

    # --------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """Run totals (all attempts of a resumed run) for summary.json and the end-of-run table."""
        t = self.totals
        out: dict[str, Any] = {
            "samples_seen": t["samples"],
            "tokens_seen": t["tokens"],
            "flops": t["flops"],
            "elapsed_s": t["elapsed_s"],
            "data_wait_pct": 100.0 * t["data_wait_s"] / t["elapsed_s"] if t["elapsed_s"] else None,
            "mean_mfu": t["mfu_x_time"] / t["mfu_time_s"] if t["mfu_time_s"] else None,
            "peak_flops_per_device": self.peak,
            "peak_source": self.peak_source,
        }
        if self.energy_source != "off":
            out.update(self._energy_keys())
        return out

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, default in _TOTALS.items():
            self.totals[k] = type(default)(state.get(k, default))

    def close(self) -> None:
        if self.energy is not None:
            self.energy.close()
            self.energy = None
