"""Peak FLOP/s per device, the denominator of MFU.

GPUs: a table of dense (no sparsity) tensor-core peaks per model and dtype, each entry with its
source. A GPU that is not in the table has no peak: MFU is reported as null rather than guessed
(set ``metrics.peak_tflops`` to supply one). CPUs have no published per-dtype peak a run could
trust, so a short matmul probe at start measures what this process can reach.

``find_peak`` picks one per run: ``metrics.peak_tflops`` where set, else the table on a GPU, else
the probe on every rank, averaged (one figure for the job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distrain.parallel import HostComm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuPeak:
    match: tuple[str, ...]  # every substring must occur in torch.cuda.get_device_name()
    tflops: dict[str, float]  # dtype -> dense TFLOP/s
    source: str
    memory_gb: float = 0.0  # the datasheet's memory (GB) and maximum board power (W)
    power_w: float = 0.0

    @property
    def name(self) -> str:
        return " ".join(self.match)


# dense figures: the datasheets quote bf16/fp16/tf32 "with sparsity"; these are half of those
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak(
        ("H200", "NVL"),
        {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
        "NVIDIA H200 Tensor Core GPU datasheet (H200 NVL column)",
        memory_gb=141,
        power_w=600,
    ),
    GpuPeak(
        ("H200",),
        {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 67.0},
        "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column)",
        memory_gb=141,
        power_w=700,
    ),
    GpuPeak(
        ("H100", "NVL"),
        {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
        "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL column)",
        memory_gb=94,
        power_w=400,
    ),
    GpuPeak(
        ("H100", "PCIe"),
        {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
        "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column)",
        memory_gb=80,
        power_w=350,
    ),
    GpuPeak(
        ("H100",),  # "NVIDIA H100 80GB HBM3": the SXM5 part
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column)",
        memory_gb=80,
        power_w=700,
    ),
    GpuPeak(
        ("A100",),
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        "NVIDIA A100 Tensor Core GPU datasheet",
        memory_gb=80,
        power_w=400,
    ),
    GpuPeak(
        ("L40S",),
        {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
        "NVIDIA L40S datasheet",
        memory_gb=48,
        power_w=350,
    ),
    GpuPeak(
        ("L4",),
        {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
        "NVIDIA L4 Tensor Core GPU datasheet",
        memory_gb=24,
        power_w=72,
    ),
    GpuPeak(
        ("V100", "PCIE"),
        {"fp16": 112.0, "fp32": 14.0},
        "NVIDIA V100 Tensor Core GPU datasheet (PCIe column); no bf16",
        memory_gb=32,
        power_w=250,
    ),
    GpuPeak(
        ("V100",),
        {"fp16": 125.0, "fp32": 15.7},
        "NVIDIA V100 Tensor Core GPU datasheet (SXM2 column); no bf16",
        memory_gb=32,
        power_w=300,
    ),
)


def find_gpu(name: str) -> GpuPeak | None:
    """The table's entry for a card named like ``torch.cuda.get_device_name()`` (or "H100 SXM")."""
    upper = name.upper()
    for entry in GPU_PEAKS:
        if all(m.upper() in upper for m in entry.match):
            return entry
    return None


def gpu_peak_flops(device_name: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, source) for a GPU named like ``torch.cuda.get_device_name()``; (None, reason)
    when the card or the dtype is not in the table."""
    upper = device_name.upper()
    for entry in GPU_PEAKS:
        if all(m.upper() in upper for m in entry.match):
            if dtype not in entry.tflops:
                return None, f"{device_name} has no {dtype} peak in the table"
            return entry.tflops[dtype] * 1e12, entry.source
    return None, f"{device_name} is not in the peak-FLOPs table"


def cuda_matmul_dtype(precision: str) -> str:
    """The dtype key the matmuls of a run at ``precision`` use on CUDA."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def cpu_probe_flops(dtype: torch.dtype = torch.float32, n: int = 512, budget_s: float = 0.3) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on this process's CPU threads, best of repeated runs
    within ``budget_s`` (a measured, reachable peak: MFU on a CPU is relative to it)."""
    g = torch.Generator().manual_seed(0)  # its own stream: the run's random streams stay untouched
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool and kernel selection
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if runs >= 200:
            break
    return 2.0 * n**3 / best


def find_peak(
    peak_tflops: float | None, precision: str, device: torch.device, comm: HostComm
) -> tuple[float | None, str]:
    """(peak FLOP/s per device, its source) for MFU: ``peak_tflops`` (``metrics.peak_tflops``) where
    set, else the GPU table on CUDA (None where the card is not in it), else the CPU matmul probe of
    every rank averaged over ``comm``. Collective on the CPU path: every rank calls it."""
    if peak_tflops is not None:
        return peak_tflops * 1e12, "metrics.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = gpu_peak_flops(name, cuda_matmul_dtype(precision))
        if peak is None:
            log.warning("MFU is not reported: %s; set metrics.peak_tflops to this GPU's dense peak", source)
        return peak, source
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    comm.barrier()  # every rank probes at once, as they will train
    probe = comm.mean(torch.tensor(cpu_probe_flops(dtype), dtype=torch.float64))
    return probe, f"CPU matmul probe ({str(dtype)[6:]})"
