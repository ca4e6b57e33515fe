"""Model registry. Models are plain ``nn.Module``s: no DeepSpeed or torch.distributed in here.

Adding a model is one file with a ``SPEC`` plus one line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config


@dataclass(frozen=True)
class ModelSpec:
    name: str
    batch_kind: Literal["tokens", "images"]
    build: Callable[[Config], nn.Module]
    """Build the module from the config, random init (``init_from`` is applied by the caller)."""
    loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    """Mean loss of one micro-batch."""
    flops_per_sample: Callable[[Config], float]
    """Training FLOPs (forward + backward) per sample."""


# name -> module holding a SPEC; the module is imported on first use (torch is heavy)
_REGISTRY: dict[str, str] = {
    "gpt": "distrain.models.gpt",
    "resnet": "distrain.models.resnet",
    "lstm": "distrain.models.lstm",
}


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec for ``name`` (its module is imported on first use)."""
    if name not in _REGISTRY:
        raise ValueError(f"model.name={name!r} is not registered; known models: {', '.join(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[name]).SPEC


def build_model(cfg: Config) -> nn.Module:
    """Build the configured model (seeded by run.seed), apply ``init_from`` and ``freeze``."""
    import torch

    from distrain.models.weights import apply_freeze, load_init_weights

    torch.manual_seed(cfg.run.seed)
    model = get_spec(cfg.model.name).build(cfg)
    if cfg.model.init_from:
        load_init_weights(model, cfg.model.init_from)
    if cfg.model.freeze:
        apply_freeze(model, cfg.model.freeze)
    return model
