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

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from distrain.metrics.energy import TOTALS as ENERGY_TOTALS
from distrain.metrics.energy import EnergyMeter
from distrain.metrics.peak import find_peak
from distrain.metrics.throughput import PHASES, Throughput
from distrain.metrics.throughput import TOTALS as THROUGHPUT_TOTALS

if TYPE_CHECKING:
    from distrain.parallel import DistInfo

__all__ = ["PHASES", "EnergyMeter", "Meters", "Throughput", "find_peak"]

# the checkpointed totals: one flat dict, keys in this order (as every checkpoint so far holds them)
_KEYS = (
    "samples",
    "tokens",
    "flops",
    "energy_j",
    "elapsed_s",
    "data_wait_s",
    "mfu_time_s",
    "mfu_x_time",
    "energy_estimated",
)
_TOTALS: dict[str, Any] = {k: {**THROUGHPUT_TOTALS, **ENERGY_TOTALS}[k] for k in _KEYS}


class _Totals(MutableMapping):
    """The meters' totals as one flat dict: each key is read and written in the meter that owns it."""

    def __init__(self, *parts: dict[str, Any]):
        self._parts = parts

    def _owner(self, key: str) -> dict[str, Any]:
        for part in self._parts:
            if key in part:
                return part
        raise KeyError(key)

    def __getitem__(self, key: str) -> Any:
        return self._owner(key)[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._owner(key)[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("the run totals have fixed keys")

    def __iter__(self) -> Iterator[str]:
        return iter(_TOTALS)

    def __len__(self) -> int:
        return len(_TOTALS)

    def __repr__(self) -> str:
        return repr(dict(self))


class _Part:
    """An attribute of ``Meters`` that lives on one of its meters (read there; only that meter
    writes it)."""

    def __init__(self, part: str, name: str):
        self.part, self.name = part, name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"Meters.{self.name} is {self.part}'s; it sets it itself")


class Meters:
    """The accounting beside every step, for the trainer: ``Throughput`` (clocks, phases, rates,
    MFU), ``EnergyMeter`` (one reader per node, summed) and ``find_peak`` (the MFU denominator),
    with their totals as one flat dict (``totals``, ``state_dict``) that survives resume."""

    win_steps = _Part("throughput", "win_steps")
    win_t0 = _Part("throughput", "win_t0")
    win_phase = _Part("throughput", "win_phase")
    per_step_samples = _Part("throughput", "per_step_samples")
    per_step_tokens = _Part("throughput", "per_step_tokens")
    flops_per_step = _Part("throughput", "flops_per_step")
    hfu_factor = _Part("throughput", "hfu_factor")
    peak = _Part("throughput", "peak")
    peak_source = _Part("throughput", "peak_source")
    energy = _Part("energy_meter", "reader")
    energy_source = _Part("energy_meter", "source")
    win_energy_j = _Part("energy_meter", "win_energy_j")

    def __init__(
        self,
        cfg,
        dist_info: DistInfo,
        per_step_samples: int,
        tokens_per_sample: int | None,
        flops_per_sample: float,
    ):
        self.cfg = cfg
        self.mcfg = cfg.metrics
        self.accounting = cfg.metrics.accounting
        self.dist = dist_info
        self.world = dist_info.world_size
        self.throughput = Throughput(
            per_step_samples,
            tokens_per_sample,
            flops_per_sample,
            dist_info.world_size,
            accounting=self.accounting,
            hfu_factor=4.0 / 3.0 if cfg.parallel.activation_checkpointing else 1.0,
            cuda=dist_info.device.type == "cuda",
        )
        self.energy_meter = EnergyMeter(cfg.metrics, dist_info)
        self._totals = _Totals(self.throughput.totals, self.energy_meter.totals)

    @property
    def totals(self) -> MutableMapping[str, Any]:
        return self._totals

    # ----------------------------------------------------------------------------- set-up
    def start(self, workers: list[dict[str, Any]]) -> None:
        """Collective (every rank): peak FLOP/s, the energy reader of each node, the clocks.
        ``workers``: every rank's ``host`` and ``gpu`` (UUID or None), in rank order."""
        peak: tuple[float | None, str] = (None, "off")
        if self.accounting:
            peak = find_peak(
                self.mcfg.peak_tflops, self.cfg.parallel.precision, self.dist.device, self.dist.comm
            )
            if self.mcfg.energy:
                self.energy_meter.open(workers)
        self.throughput.start(*peak)
        self.energy_meter.reset_window()

    def restart_clocks(self) -> None:
        """Training time starts now (after set-up, probes and the first data iterator)."""
        self.throughput.restart_clocks()
        self.energy_meter.restart()

    # ---------------------------------------------------------------------------- timing
    def mark(self) -> None:
        """Start of a step: time until the next ``lap`` belongs to its phase."""
        self.throughput.mark()

    def lap(self, phase: str) -> None:
        """The time since the previous mark or lap was spent in ``phase``."""
        self.throughput.lap(phase)

    def step_done(self) -> None:
        self.throughput.step_done()

    def elapsed(self) -> float:
        return self.throughput.elapsed()

    # ------------------------------------------------------------------------- windows
    def flush(self) -> None:
        """Collective: close the energy window (synchronize, read, sum over nodes) into the totals.
        Called at every record and before every checkpoint, so saved totals are current."""
        self.throughput.flush()
        self.energy_meter.flush()

    def record(self) -> dict[str, Any]:
        """Close the window: the accounting keys of a metrics.jsonl record (collective)."""
        self.flush()
        rec, wall = self.throughput.window_keys()
        if self.accounting and self.energy_meter.on:
            rec.update(self._energy_keys())
            rec["power_w"] = self.energy_meter.power_w(wall)
        rec.update(self.throughput.total_keys())
        self.throughput.reset_window()
        self.energy_meter.reset_window()
        return rec

    def _energy_keys(self) -> dict[str, Any]:
        t = self.throughput.totals
        return self.energy_meter.keys(t["samples"], t["tokens"] if self.throughput.per_step_tokens else None)

    # --------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """Run totals (all attempts of a resumed run) for summary.json and the end-of-run table."""
        out = self.throughput.summary()
        if self.energy_meter.on:
            out.update(self._energy_keys())
        return out

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The totals, flat (the keys of ``_TOTALS``): what a checkpoint holds."""
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's totals; a key it lacks (an older checkpoint) keeps its default."""
        self.throughput.load_state_dict(state)
        self.energy_meter.load_state_dict(state)

    def close(self) -> None:
        self.energy_meter.close()
