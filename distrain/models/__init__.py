"""The model registry. Models are plain ``nn.Module``s: no DeepSpeed or torch.distributed in here.

Adding a model is one file plus one line in ``distrain.catalog`` (the table of shipped models, which
the config reads too: the registry imports no config, the config no registry). The file holds the
model's config class (a ``ModelSection`` with its fields and its own rules), its ``nn.Module`` and
its ``SPEC``; it imports torch only inside functions, so that validating a config never imports
torch. ``register`` adds a model defined elsewhere (a user's own file, a test) in the running
process.

A model is made of parts, each trained by an engine of its own: ``{"model": m}`` for most, and
``{"generator": g, "discriminator": d}`` for a GAN. One training step is the model's ``updates`` in
order, each a loss over all parts that steps one part (its engine and optimizer); while an update
runs the other parts take no gradient. A one-part model's single update is its ``loss``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distrain.catalog import MODELS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config
    from distrain.config.schema import ModelSection


Parts = dict[str, Any]  # part name -> its module, or the engine that wraps it (called the same way)


@dataclass(frozen=True)
class Update:
    """One optimizer update of a training step: the part it steps and the loss it minimises."""

    part: str
    loss: Callable[[Parts, dict[str, Any], Any], torch.Tensor]
    """Mean loss of one micro-batch: ``loss(parts, batch, state)`` (``state``: the model's own, or None)."""


@dataclass(frozen=True)
class Generative:
    """What makes a model generative: it maps latents to images (in the data's normalised space)."""

    latent: Callable[[Config, int, torch.Generator], torch.Tensor]
    """``n`` latents drawn from a CPU generator (the fixed batch of the sample grids)."""
    decode: Callable[[Parts, torch.Tensor], torch.Tensor]
    """Images from latents (eval mode, no gradient)."""
    export_part: str
    """The part ``distrain export`` writes: the generator, or the part holding the decoder."""
    export_prefix: str = ""
    """Keys of that part under this prefix only, the prefix removed (the VAE's ``decoder.``)."""
    export_module: Callable[[Config], nn.Module] | None = None
    """Builds the module the export loads into (default: the part itself)."""
    reconstruct: Callable[[Parts, torch.Tensor], torch.Tensor] | None = None
    """Images -> their reconstructions (autoencoders), shown beside the samples."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: type[ModelSection]
    """The model's config class: the ``model`` section when ``model.name`` is this name."""
    build: Callable[[Config], nn.Module | dict[str, nn.Module]]
    """Build the module (a one-part model) or the parts named by ``config.parts``, random init
    (``init_from`` is applied by the caller)."""
    loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None
    """A one-part model: mean loss of one micro-batch (its one update). None with ``updates``."""
    flops_per_sample: Callable[[Config], float | dict[str, float]]
    """Training FLOPs (forward + backward) per sample of one step: a number, or one per part."""
    updates: Callable[[Config], tuple[Update, ...]] | None = None
    """A model of several parts (or with a state): the updates of one training step, in order."""
    evaluate: Callable[[Config], Callable[[Parts, dict[str, Any], Any], dict[str, torch.Tensor]]] | None = (
        None
    )
    """Eval figures of one micro-batch (``eval_<key>`` in metrics.jsonl); default ``{"loss": loss}``."""
    state: Callable[[Config], Any] | None = None
    """The model's own checkpointed state (``state_dict``/``load_state_dict``/``after_step``),
    handed to its losses: e.g. the VAE's KL warm-up."""
    generative: Generative | None = None
    """A generative model's latents, samples and exported part."""

    @property
    def batch_kind(self) -> str:
        """What a batch holds: "tokens" (``input_ids``) or "images" (``images``, ``labels``)."""
        return self.config.batch_kind

    @property
    def parts(self) -> tuple[str, ...]:
        return self.config.parts

    def steps(self, cfg: Config) -> tuple[Update, ...]:
        """The updates of one training step; a one-part model's is its loss on its one part."""
        if self.updates is not None:
            return self.updates(cfg)
        part, loss = self.parts[0], self.loss
        return (Update(part, lambda parts, batch, state: loss(parts[part], batch)),)

    def eval_figures(self, cfg: Config) -> Callable[[Parts, dict[str, Any], Any], dict[str, torch.Tensor]]:
        """Eval figures of one micro-batch: the model's own, else its loss as ``loss``."""
        if self.evaluate is not None:
            return self.evaluate(cfg)
        part, loss = self.parts[0], self.loss
        return lambda parts, batch, state: {"loss": loss(parts[part], batch)}

    def flops_by_part(self, cfg: Config) -> dict[str, float]:
        """Training FLOPs per sample of one step, by part (a one-part model's is all its own)."""
        f = self.flops_per_sample(cfg)
        return dict(f) if isinstance(f, dict) else {self.parts[0]: float(f)}


_REGISTERED: dict[str, ModelSpec] = {}  # added in this process by register()


def register(spec: ModelSpec) -> None:
    """Make ``spec`` a model ``model.name`` can name, in this process (a launcher's workers import
    the module that calls this, or name it in ``distrain.catalog``)."""
    if spec.config.model_fields["name"].default != spec.name:
        raise ValueError(f"{spec.config.__name__}.name must default to {spec.name!r}, the spec's name")
    _REGISTERED[spec.name] = spec
    spec.config.enroll()  # the config validates model.name=<spec.name> with spec.config


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec for ``name`` (its module is imported on first use)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in MODELS:
        raise ValueError(
            f"model.name={name!r} is not a known model; allowed: {', '.join(dict.fromkeys([*MODELS, *_REGISTERED]))}"
        )
    return importlib.import_module(MODELS[name]).SPEC


def build_parts(cfg: Config) -> dict[str, nn.Module]:
    """Build the configured model's parts (seeded by run.seed), apply ``init_from`` and ``freeze``
    (to a one-part model; see ``ModelSection.check``)."""
    import torch

    from distrain.models.weights import apply_freeze, load_init_weights

    torch.manual_seed(cfg.run.seed)
    spec = get_spec(cfg.model.name)
    built = spec.build(cfg)
    parts = dict(built) if isinstance(built, dict) else {spec.parts[0]: built}
    if list(parts) != list(spec.parts):
        raise ValueError(
            f"{spec.name}: build made parts {list(parts)}, its config declares {list(spec.parts)}"
        )
    for module in parts.values():
        if cfg.model.init_from:
            load_init_weights(module, cfg.model.init_from)
        if cfg.model.freeze:
            apply_freeze(module, cfg.model.freeze)
    return parts


def build_model(cfg: Config) -> nn.Module:
    """Build a one-part model (seeded by run.seed), with ``init_from`` and ``freeze`` applied."""
    parts = build_parts(cfg)
    if len(parts) != 1:
        raise ValueError(f"model.name={cfg.model.name} has parts {list(parts)}; use build_parts")
    return next(iter(parts.values()))
