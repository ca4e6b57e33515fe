"""Typed config -> torch.distributed + DeepSpeed engine. Models are wrapped here, never in models/."""

from distrain.parallel.collectives import HostComm, StepAgreement
from distrain.parallel.dist import DistInfo, check_device, configure_cuda, init_distributed
from distrain.parallel.engine import build_ds_config, build_engine

__all__ = [
    "DistInfo",
    "HostComm",
    "StepAgreement",
    "build_ds_config",
    "build_engine",
    "check_device",
    "configure_cuda",
    "init_distributed",
]
