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

``EnergyMeter`` does that for a job: it opens the reader on the lowest rank of each host, and sums
what every node's reader counted over each window (the edges being each record and checkpoint).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrain.config.schema import MetricsConfig
    from distrain.parallel import DistInfo

log = logging.getLogger(__name__)

TOTALS: dict[str, Any] = {"energy_j": 0.0, "energy_estimated": False}

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
            try:
                import pynvml as nvml
            except ImportError:
                raise ImportError(
                    "GPU energy needs NVML's Python bindings (nvidia-ml-py): pip install 'distrain[gpu]'"
                ) from None
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
        except ImportError as exc:  # the [gpu] extra is not installed
            log.warning("GPU energy is not measured: %s; only CPU energy is reported", exc)
            unmeasured = True
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


class EnergyMeter:
    """The job's energy: one ``NodeEnergy`` per host, read at the edges of each window and summed
    over nodes through ``dist_info.comm``. ``source`` is "off" until ``open`` (and stays so when
    energy is not counted); ``totals`` holds the job's joules and whether any node estimated."""

    def __init__(self, mcfg: MetricsConfig, dist_info: DistInfo):
        self.mcfg = mcfg
        self.rank = dist_info.rank
        self.device = dist_info.device
        self.comm = dist_info.comm
        self.reader: NodeEnergy | None = None  # this host's, on its lowest rank only
        self.source = "off"
        self.totals: dict[str, Any] = dict(TOTALS)
        self.win_energy_j = 0.0  # the job's joules in the current window
        self._read = 0.0  # this node's reader total at the previous flush

    @property
    def on(self) -> bool:
        return self.source != "off"

    def open(self, workers: list[dict[str, Any]]) -> None:
        """Collective. The lowest rank on each host reads that host's devices (every rank's GPU on
        it); ``workers``: every rank's ``rank``, ``host`` and ``gpu`` (UUID or None), in rank order."""
        host = workers[self.rank]["host"]
        on_host = [w for w in workers if w["host"] == host]
        if min(w["rank"] for w in on_host) == self.rank:
            uuids = sorted({w["gpu"] for w in on_host if w["gpu"]})
            self.reader = open_node_energy(uuids, self.cpu_watts(), self.mcfg.power_sample_s)
        # every rank learns the job's label (the same wherever nodes are alike)
        label = [self.reader.source if self.reader else None, bool(self.reader and self.reader.estimated)]
        labels = self.comm.gather(label)
        self.source = ",".join(sorted({src for src, _ in labels if src}))
        self.totals["energy_estimated"] = self.totals["energy_estimated"] or any(est for _, est in labels)

    def cpu_watts(self) -> float:
        """A node's CPU power at full load for the estimate: ``metrics.cpu_watts``, else 10 W per CPU."""
        if self.mcfg.cpu_watts is not None:
            return self.mcfg.cpu_watts
        return 10.0 * (os.cpu_count() or 1)

    def reset_window(self) -> None:
        self.win_energy_j = 0.0

    def restart(self) -> None:
        """Training starts now: energy used before (set-up, probes) is not counted, as its time is
        not (a local read of this node's counter)."""
        self._read = self.reader.read() if self.reader else 0.0
        self.reset_window()

    def flush(self) -> None:
        """Collective: close the energy window (synchronize the device, read, sum over nodes) into
        the window and the totals. Nothing where energy is off."""
        if not self.on:
            return
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.reader.read() if self.reader else 0.0
        joules = float(self.comm.sum(torch.tensor(now - self._read, dtype=torch.float64)))
        self._read = now
        self.win_energy_j += joules
        self.totals["energy_j"] += joules

    def power_w(self, wall_s: float) -> float:
        """The job's mean power over a window of ``wall_s`` seconds (after ``flush``)."""
        return self.win_energy_j / wall_s

    def keys(self, samples: int, tokens: int | None) -> dict[str, Any]:
        """The job's energy so far: J, kWh, CO2e (kWh x PUE x grid g/kWh), J per sample and, where
        ``tokens`` are counted (not None), J per token; with the source label."""
        j, m = self.totals["energy_j"], self.mcfg
        out: dict[str, Any] = {
            "energy_j": j,
            "energy_kwh": j / 3.6e6,
            "co2e_kg": co2e_kg(j, m.grid_g_per_kwh, m.pue),
            "j_per_sample": j / samples if samples else None,
        }
        if tokens is not None:
            out["j_per_token"] = j / tokens if tokens else None
        out["energy_source"] = self.source
        out["energy_estimated"] = bool(self.totals["energy_estimated"])
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This meter's keys of a checkpoint's flat totals; a key missing keeps its default."""
        for k, default in TOTALS.items():
            self.totals[k] = type(default)(state.get(k, default))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
