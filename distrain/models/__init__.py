"""The model registry. Models are plain ``nn.Module``s: no DeepSpeed or torch.distributed in here.

Adding a model is one file plus one registry line. The file holds the model's config class (a
``ModelSection`` with its fields and its own rules), its ``nn.Module`` and its ``SPEC``; it imports
torch only inside functions, so that validating a config never imports torch. ``register`` adds a
model defined elsewhere (a user's own file, a test) in the running process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config
    from distrain.config.schema import ModelSection


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: type[ModelSection]
    """The model's config class: the ``model`` section when ``model.name`` is this name."""
    build: Callable[[Config], nn.Module]
    """Build the module from the config, random init (``init_from`` is applied by the caller)."""
    loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    """Mean loss of one micro-batch."""
    flops_per_sample: Callable[[Config], float]
    """Training FLOPs (forward + backward) per sample."""

    @property
    def batch_kind(self) -> str:
        """What a batch holds: "tokens" (``input_ids``) or "images" (``images``, ``labels``)."""
        return self.config.batch_kind


# name -> module holding a SPEC; the module is imported on first use
_REGISTRY: dict[str, str] = {
    "gpt": "distrain.models.gpt",
    "resnet": "distrain.models.resnet",
    "lstm": "distrain.models.lstm",
}
_REGISTERED: dict[str, ModelSpec] = {}  # added in this process by register()


def register(spec: ModelSpec) -> None:
    """Make ``spec`` a model ``model.name`` can name, in this process (a launcher's workers import
    the module that calls this, or name it in ``_REGISTRY``)."""
    if spec.config.model_fields["name"].default != spec.name:
        raise ValueError(f"{spec.config.__name__}.name must default to {spec.name!r}, the spec's name")
    _REGISTERED[spec.name] = spec


def names(shipped: bool = False) -> list[str]:
    """The model names ``model.name`` takes: the shipped ones (``shipped``), or also those added
    in this process by ``register``."""
    extra = [] if shipped else [n for n in _REGISTERED if n not in _REGISTRY]
    return [*_REGISTRY, *extra]


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec for ``name`` (its module is imported on first use)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _REGISTRY:
        raise ValueError(f"model.name={name!r} is not a known model; allowed: {', '.join(names())}")
    return importlib.import_module(_REGISTRY[name]).SPEC


def model_config_class(name: str) -> type[ModelSection]:
    return get_spec(name).config


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
