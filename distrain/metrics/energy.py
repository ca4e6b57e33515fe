"""Energy of a node's devices, read from counters, counted once per node.

- GPUs: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the
  driver loaded; Volta and newer), read at the edges of a step window after a device synchronize.
  A GPU without the counter falls back to sampling ``nvmlDeviceGetPowerUsage`` in a thread and
  integrating (trapezoids).
- CPUs: RAPL package counters under ``/sys/class/powercap`` (``intel-rapl:N/energy_uj``, with
  wrap-around at ``max_energy_range_uj``) where readable; otherwise an estimate,
  ``metrics.cpu_watts`` x the node's CPU utilisation from ``/proc/stat``, labelled ``estimated``.

One process per node reads (the lowest rank on each host); the others read nothing, and the job
total is the sum over ranks, so every node counts once however many ranks it runs.
CO2e = kWh x grid intensity (g/kWh) x PUE.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POWERCAP_ROOT = Path(os.environ.get("DISTRAIN_POWERCAP_ROOT", "/sys/class/powercap"))


def gpu_uuid(device) -> str | None:
    """The NVML UUID (``GPU-...``) of a torch CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    import torch

    u = str(torch.cuda.get_device_properties(device).uuid)
    return u if u.startswith("GPU-") else f"GPU-{u}"


def co2e_kg(joules: float, grid_g_per_kwh: float, pue: float) -> float:
    """kg CO2-equivalent of ``joules`` at the meter: kWh x PUE x grid intensity."""
    return joules / 3.6e6 * pue * grid_g_per_kwh / 1000.0


class RaplReader:
    """Cumulative joules of the CPU packages from the powercap RAPL counters."""

    kind = "rapl"
    estimated = False

    def __init__(self, root: Path = POWERCAP_ROOT):
        self.domains: list[tuple[Path, int]] = []
        for d in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
            if not re.fullmatch(r"intel-rapl:\d+", d.name):  # sub-domains (core, dram) lie inside a package
                continue
            try:
                int((d / "energy_uj").read_text())
                wrap = int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue  # unreadable (energy_uj is root-only on many kernels)
            self.domains.append((d / "energy_uj", wrap))
        self._last = [self._raw(p) for p, _ in self.domains]
        self._total_uj = 0

    @staticmethod
    def _raw(path: Path) -> int:
        return int(path.read_text())

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read(self) -> float:
        for i, (path, wrap) in enumerate(self.domains):
            now = self._raw(path)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += wrap
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6

    def close(self) -> None:
        pass


class CpuEstimate:
    """``watts`` x the node's CPU utilisation over each interval (from /proc/stat): an estimate."""

    kind = "estimated"
    estimated = True

    def __init__(self, watts: float, stat_path: Path = Path("/proc/stat")):
        self.watts = watts
        self.stat_path = stat_path
        self._last = self._sample()
        self._total = 0.0

    def _sample(self) -> tuple[float, int, int]:
        fields = self.stat_path.read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        return time.monotonic(), sum(ticks), idle

    @property
    def available(self) -> bool:
        return True

    def read(self) -> float:
        t, total, idle = self._sample()
        t0, total0, idle0 = self._last
        if total > total0:
            util = 1.0 - (idle - idle0) / (total - total0)
            self._total += self.watts * max(0.0, min(1.0, util)) * (t - t0)
        self._last = (t, total, idle)
        return self._total

    def close(self) -> None:
        pass


class NvmlReader:
    """Cumulative joules of the GPUs with the given UUIDs, from NVML's energy counter or, per device
    without one, from sampled power. ``nvml`` is the ``pynvml`` module (nvidia-ml-py)."""

    kind = "nvml"
    estimated = False

    def __init__(self, uuids: list[str], nvml: Any = None, sample_s: float = 0.1):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [nvml.nvmlDeviceGetHandleByUUID(u) for u in uuids]
        self._start: dict[int, int] = {}  # device index -> counter at open (mJ)
        self._sampled: list[int] = []
        for i, h in enumerate(self.handles):
            try:
                self._start[i] = nvml.nvmlDeviceGetTotalEnergyConsumption(h)
            except nvml.NVMLError:
                self._sampled.append(i)
        self.kind = "nvml" if not self._sampled else ("nvml_power" if not self._start else "nvml+nvml_power")
        self._sampled_j = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self._sampled:
            log.info(
                "GPU energy: %d device(s) lack NVML's energy counter; sampling power", len(self._sampled)
            )
            self._prev = (time.monotonic(), self._power_w())
            self._thread = threading.Thread(target=self._sample_loop, args=(sample_s,), daemon=True)
            self._thread.start()

    def _power_w(self) -> float:
        return sum(self.nvml.nvmlDeviceGetPowerUsage(self.handles[i]) for i in self._sampled) / 1000.0

    def _sample_once(self) -> None:
        t, p = time.monotonic(), self._power_w()
        with self._lock:
            t0, p0 = self._prev
            self._sampled_j += 0.5 * (p + p0) * (t - t0)
            self._prev = (t, p)

    def _sample_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._sample_once()
            except Exception as exc:  # noqa: BLE001 - a sampling error ends sampling, not training
                log.warning("GPU power sampling stopped: %s", exc)
                return

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def read(self) -> float:
        mj = sum(
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handles[i]) - s for i, s in self._start.items()
        )
        if self._sampled:
            self._sample_once()  # close the last interval at this window edge
        with self._lock:
            return mj / 1000.0 + self._sampled_j

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


class NodeEnergy:
    """The energy of one node: its GPUs (NVML) plus its CPUs (RAPL, else an estimate)."""

    def __init__(self, readers: list[Any], gpus_unmeasured: bool = False):
        self.readers = readers
        self.source = "+".join(r.kind for r in readers) if readers else "none"
        if gpus_unmeasured:
            self.source += "+gpus_unmeasured"
        self.estimated = any(r.estimated for r in readers)

    def read(self) -> float:
        return sum(r.read() for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def open_node_energy(gpu_uuids: list[str], cpu_watts: float, sample_s: float = 0.1) -> NodeEnergy:
    """The readers this node has: NVML for ``gpu_uuids`` (if any), RAPL or the CPU estimate."""
    readers: list[Any] = []
    unmeasured = False
    if gpu_uuids:
        try:
            readers.append(NvmlReader(gpu_uuids, sample_s=sample_s))
        except Exception as exc:  # noqa: BLE001 - no NVML: GPU energy is unknown, not guessed
            log.warning(
                "GPU energy is not measured (NVML unavailable: %s); check that the NVIDIA driver's "
                "libnvidia-ml loads (nvidia-smi works); only CPU energy is reported",
                exc,
            )
            unmeasured = True
    rapl = RaplReader()
    readers.append(rapl if rapl.available else CpuEstimate(cpu_watts))
    return NodeEnergy(readers, gpus_unmeasured=unmeasured)
