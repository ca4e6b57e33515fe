"""Typed config -> torch.distributed + DeepSpeed engine. Models are wrapped here, never in models/."""

from distrain.parallel.dist import DistInfo, check_device, gather_objects, init_distributed
from distrain.parallel.engine import build_ds_config, build_engine

__all__ = [
    "DistInfo",
    "build_ds_config",
    "build_engine",
    "check_device",
    "gather_objects",
    "init_distributed",
]
