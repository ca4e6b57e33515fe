"""``distrain export``: consolidated fp32 weights from any ZeRO stage, as safetensors, a Hugging Face
model directory (gpt) or a torchvision state dict (resnet). A generative model exports what makes
images: the GAN's generator, the VAE's decoder.

The checkpoint is verified against its manifest before any of DeepSpeed's files is unpickled."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distrain.checkpoint import CheckpointError, newest_valid, verify
from distrain.config import load_config
from distrain.errors import ConfigError
from distrain.models import get_spec

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "hf", "torchvision")


def consolidated_state_dict(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a (verified) DeepSpeed checkpoint directory."""
    if zero_stage > 0 or any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
            return {k: v.float() for k, v in sd.items()}
        except (ValueError, FileNotFoundError):
            if zero_stage > 0:
                raise
    # ZeRO 0: DeepSpeed's model file holds the whole module
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}


def universal_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from one part of a DeepSpeed universal checkpoint (``to_universal``), whose
    conversion merged the tensor-parallel shards: ``zero/<name>/fp32.pt`` per parameter."""
    sd = {}
    for d in sorted((folder / "zero").iterdir()):
        if (d / "fp32.pt").is_file():
            sd[d.name] = torch.load(d / "fp32.pt", map_location="cpu", weights_only=True)["param"].float()
    return sd


def checkpoint_weights(ckpt: Path, manifest: dict, cfg) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of the part ``cfg``'s model exports (``part_dir``) from a verified
    checkpoint: consolidated over ZeRO's partitions, and over AutoTP's shards (through the
    universal format, converted once beside the checkpoint)."""
    if cfg.parallel.tensor_parallel > 1:
        from distrain.checkpoint import to_universal

        spec = get_spec(cfg.model.name)
        universal = to_universal(ckpt, spec.parts)
        sd = universal_state_dict(universal / part_dir(ckpt, cfg).name)
        if getattr(cfg.model, "tie_embeddings", False):  # the conversion keeps one vocabulary shard of the
            sd.pop("lm_head.weight", None)  # tied head's second name; the embedding is whole, and is the head
        return sd
    return consolidated_state_dict(part_dir(ckpt, cfg), manifest["zero_stage"])


def part_dir(ckpt: Path, cfg) -> Path:
    """The DeepSpeed shards a model exports: a generative model's generator (or the part that holds
    its decoder), else its one part."""
    from distrain.checkpoint import engine_dir

    spec = get_spec(cfg.model.name)
    where, tag = engine_dir(ckpt, spec.generative.export_part if spec.generative else spec.parts[0])
    return where / tag


def export_module(cfg) -> torch.nn.Module:
    """A fresh module of the kind ``distrain export`` writes for ``cfg`` (random init): what the
    exported weights load into."""
    from distrain.models import build_parts

    spec = get_spec(cfg.model.name)
    gen = spec.generative
    if gen is not None and gen.export_module is not None:
        return gen.export_module(cfg)
    return build_parts(cfg)[gen.export_part if gen else spec.parts[0]]


def _checkpoint(run_dir: Path, step: int | None) -> tuple[Path, dict]:
    """The checkpoint to export (``step``, or the newest that verifies) and its manifest."""
    root = run_dir / "checkpoints"
    if step is None:
        found = newest_valid(root)
        if found is None:
            raise CheckpointError(f"{root} holds no complete, verified checkpoint")
        return found
    ckpt = root / f"step{step:08d}"
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} does not exist; list {root} for the saved steps")
    return ckpt, verify(ckpt)


def _save_safetensors(sd: dict[str, torch.Tensor], out: Path, step: int) -> Path:
    from safetensors.torch import save_file

    seen: set[int] = set()
    unique = {}
    for k, v in sd.items():  # tied weights are stored once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v.contiguous()
    path = out / "model.safetensors"
    save_file(unique, str(path), metadata={"format": "pt", "step": str(step)})
    return path


def _save_hf(sd: dict[str, torch.Tensor], out: Path, cfg, ckpt: Path) -> Path:
    from distrain.models import build_model

    model = build_model(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": None, "freeze": []})})
    )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.save_pretrained(str(out))
    if cfg.data.tokenizer != "bytes":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(cfg.data.tokenizer, local_files_only=True).save_pretrained(str(out))
    return out


# a format's model restriction: (model.name it needs, what the other models export as)
_NEEDS = {"hf": ("gpt", "safetensors or torchvision"), "torchvision": ("resnet", "safetensors or hf")}


def export(run_dir: str | Path, fmt: str, out: str | Path, step: int | None = None) -> Path:
    """Write the checkpoint's consolidated fp32 weights as ``fmt`` under ``out``; returns the path."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    ckpt, manifest = _checkpoint(run_dir, step)
    cfg = load_config(run_dir / "config.yaml")
    if fmt in _NEEDS and cfg.model.name != _NEEDS[fmt][0]:
        need, other = _NEEDS[fmt]
        what = "transformers models" if fmt == "hf" else "torchvision models"
        raise ConfigError(
            f"--format {fmt} exports {what} (model.name={need}); {cfg.model.name} exports as {other}"
        )
    sd = checkpoint_weights(ckpt, manifest, cfg)
    gen = get_spec(cfg.model.name).generative
    if gen is not None and gen.export_prefix:  # the decoder of an autoencoder
        sd = {k[len(gen.export_prefix) :]: v for k, v in sd.items() if k.startswith(gen.export_prefix)}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        path = _save_safetensors(sd, out, manifest["step"])
    elif fmt == "hf":
        path = _save_hf(sd, out, cfg, ckpt)
    else:
        path = out / "model.pt"
        torch.save(sd, path)
    log.info("exported %s (step %d) as %s to %s", ckpt, manifest["step"], fmt, path)
    return path
