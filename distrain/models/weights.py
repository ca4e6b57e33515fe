"""Loading ``model.init_from`` weights and applying ``model.freeze`` patterns."""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import torch
from torch import nn

from distrain.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_STATE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a HF directory, a .safetensors file or a torch file (weights_only)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"model.init_from: {p} does not exist; give a HF model directory, a .safetensors file or a .pt/.pth state dict"
        )
    if p.is_dir():
        shards = sorted(p.glob("model-*-of-*.safetensors"))
        if shards:
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(read_state_dict(shard))
            return sd
        for name in _STATE_FILES:
            if (p / name).is_file():
                return read_state_dict(p / name)
        raise CheckpointError(
            f"model.init_from: directory {p} holds none of {', '.join(_STATE_FILES)} or sharded model-*-of-*.safetensors"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        raise CheckpointError(
            f"model.init_from: {p} is not a weights-only torch state dict ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"model.init_from: {p} does not hold a mapping of parameter names to tensors")
    return obj


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Copy matching tensors from ``path`` into ``model``; shape mismatches (a new head) are skipped."""
    sd = read_state_dict(path)
    own = model.state_dict()
    # tolerate a 'module.' prefix from DDP/DeepSpeed saves
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in own):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k, v in sd.items() if k in own and own[k].shape != v.shape)
    unexpected = sorted(k for k in sd if k not in own)
    if not usable:
        raise CheckpointError(
            f"model.init_from: no tensor in {path} matches the model's names and shapes "
            f"(file has e.g. {list(sd)[:3]}, model has e.g. {list(own)[:3]}); is model.name/preset right?"
        )
    model.load_state_dict(usable, strict=False)
    missing = sorted(k for k in own if k not in usable)
    if skipped:
        log.warning(
            "init_from: %d tensors kept their random init because shapes differ: %s",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    if unexpected:
        log.warning(
            "init_from: %d tensors in %s have no place in the model: %s",
            len(unexpected),
            path,
            ", ".join(unexpected[:5]),
        )
    if missing:
        log.info(
            "init_from: %d model tensors not in the file keep their init: %s",
            len(missing),
            ", ".join(missing[:5]),
        )
    # check that the weights arrived (a silent no-op load is the classic failure)
    after = model.state_dict()
    for k, v in usable.items():
        if not torch.equal(after[k].to(v.dtype), v):
            raise RuntimeError(f"model.init_from: tensor {k} did not load from {path}")
    log.info("init_from: loaded %d tensors from %s", len(usable), path)


def apply_freeze(model: nn.Module, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters whose names match any pattern; returns how many."""
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(
                f"model.freeze: pattern {pat!r} matches no parameter; names look like {names[:4]}"
            )
    frozen = 0
    for n, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen += p.numel()
    total = sum(p.numel() for p in model.parameters())
    if frozen == total:
        raise ConfigError(
            "model.freeze: every parameter is frozen, so nothing would train; narrow the patterns"
        )
    log.info("freeze: %d of %d parameters frozen", frozen, total)
    return frozen
