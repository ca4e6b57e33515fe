"""torch.distributed set-up the way torchrun (or Ray Train) leaves it: RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment. One process with none of them set is world size 1."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from distrain.config import Config, check_topology, mesh
from distrain.errors import TopologyError
from distrain.parallel.collectives import HostComm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # the default group's (DeepSpeed's collectives); distrain's own run on ``comm``
    comm: HostComm
    mesh: tuple[int, int, int] = (1, 1, 1)  # (dp, sp, tp): dp x sp x tp = world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the ranks of one sequence- or tensor-parallel group share a batch."""
        return self.mesh[0]

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel rank (DeepSpeed's groups are runs of sp x tp consecutive ranks)."""
        return self.rank // (self.mesh[1] * self.mesh[2])

    @property
    def group_rank(self) -> int:
        """This rank's place in its sequence- or tensor-parallel group (0 without one)."""
        return self.rank % (self.mesh[1] * self.mesh[2])


def check_device(cfg: Config) -> str:
    """Resolve run.device and refuse combinations this machine cannot run, before anything starts."""
    p = cfg.parallel
    has_cuda = torch.cuda.is_available()
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise TopologyError(
            "run.device=cuda but no CUDA GPU is visible to this process; set run.device=cpu (or auto) to train on the CPU"
        )
    if device == "cpu":
        if p.backend == "nccl":
            raise TopologyError(
                "parallel.backend=nccl needs CUDA GPUs; on the CPU set parallel.backend=gloo (or auto)"
            )
        if p.precision == "fp16":
            raise TopologyError(
                "parallel.precision=fp16 runs on CUDA only; on the CPU use parallel.precision=bf16 or fp32"
            )
        if p.offload_optimizer or p.offload_params:
            raise TopologyError(
                "parallel.offload_optimizer/offload_params move state from GPU to CPU memory; on the CPU set both to false"
            )
        # what inductor builds its CPU kernels with (torch._inductor.config.cpp.cxx)
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if p.compile and not shutil.which(cxx):
            raise TopologyError(
                f"parallel.compile=true on the CPU needs a C++ compiler: inductor builds its kernels with {cxx!r} "
                "(the CXX environment variable, else g++, clang++ on macOS), which is not on PATH; install one "
                "(apt-get install g++), point CXX at one, or set parallel.compile=false"
            )
    elif p.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TopologyError(
            f"parallel.precision=bf16 is not supported by {torch.cuda.get_device_name()}; use parallel.precision=fp16"
        )
    return device


def configure_cuda(cfg: Config, device: torch.device) -> None:
    """The process-wide CUDA choices: TF32 for fp32 matmuls and convolutions, cuDNN's autotuner."""
    if device.type != "cuda":
        return

    p = cfg.parallel
    torch.backends.cuda.matmul.allow_tf32 = p.tf32
    torch.backends.cudnn.allow_tf32 = p.tf32
    images = cfg.model.batch_kind == "images"
    torch.backends.cudnn.benchmark = images if p.cudnn_benchmark is None else p.cudnn_benchmark


def _shm_op_cached() -> bool:
    """Whether DeepSpeed's CPU shared-memory op, which its CPU backend builds at start, is built."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    pattern = "deepspeed_shm_comm/*.so"
    found = (
        Path(root).glob(pattern)
        if root
        else (Path.home() / ".cache" / "torch_extensions").glob("*/" + pattern)
    )
    return any(True for _ in found)


def init_distributed(cfg: Config) -> DistInfo:
    """Initialise the default process group (gloo on CPU, nccl on CUDA) for this process, unless a
    launcher did already, and the host group of distrain's own collectives."""
    device = check_device(cfg)
    env = os.environ
    env.setdefault("DS_ACCELERATOR", device)  # no accelerator probing (and its warning) in DeepSpeed
    if device == "cpu":  # torch's C++-extension helper warns that a CPU machine has no CUDA runtime
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    init_method = None
    if "RANK" not in env:  # a plain single process: rank 0 of 1, rendezvous through a file (no port);
        # RANK/WORLD_SIZE go to the process group, not into os.environ where child processes would see them
        fd, store = tempfile.mkstemp(prefix="distrain-pg-")
        os.close(fd)
        os.unlink(store)
        init_method = f"file://{store}"
    env.setdefault("LOCAL_RANK", "0")
    if env.get("MASTER_ADDR", "127.0.0.1").startswith("127.") or env.get("MASTER_ADDR") == "localhost":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a job on loopback keeps gloo's sockets there too
    rank, world, local_rank = (
        int(env.get("RANK", "0")),
        int(env.get("WORLD_SIZE", "1")),
        int(env["LOCAL_RANK"]),
    )
    check_topology(cfg, world)
    backend = (
        cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    )
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        kwargs = {"init_method": init_method, "rank": rank, "world_size": world} if init_method else {}
        if device == "cpu" and rank == 0 and not _shm_op_cached():
            log.info(
                "compiling DeepSpeed's CPU communication op (once, about 30-60 s; cached in %s)",
                env.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions"),
            )
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints "... built successfully"
            deepspeed.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs
            )
    else:  # made by the launcher (Ray Train's TorchConfig, a user's own init): reported as it is
        backend = torch.distributed.get_backend()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)  # adopts it
    configure_cuda(cfg, dev)
    return DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        device=dev,
        backend=backend,
        comm=HostComm.create(),
        mesh=mesh(cfg, world),
    )
