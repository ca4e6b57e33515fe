"""``distrain export``: consolidated fp32 weights from any ZeRO stage, as safetensors, a Hugging Face
model directory (gpt) or a torchvision state dict (resnet).

The checkpoint is verified against its manifest before any of DeepSpeed's files is unpickled."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distrain.checkpoint import CheckpointError, newest_valid, verify
from distrain.config import load_config

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


def export(run_dir: str | Path, fmt: str, out: str | Path, step: int | None = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    root = run_dir / "checkpoints"
    if step is not None:
        ckpt = root / f"step{step:08d}"
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt} does not exist; list {root} for the saved steps")
        manifest = verify(ckpt)
    else:
        found = newest_valid(root)
        if found is None:
            raise CheckpointError(f"{root} holds no complete, verified checkpoint")
        ckpt, manifest = found
    cfg = load_config(run_dir / "config.yaml")
    sd = consolidated_state_dict(ckpt, manifest["zero_stage"])
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        seen: dict[int, str] = {}
        unique = {}
        for k, v in sd.items():  # tied weights are stored once
            if v.data_ptr() in seen:
                continue
            seen[v.data_ptr()] = k
            unique[k] = v.contiguous()
        save_file(
            unique, str(out / "model.safetensors"), metadata={"format": "pt", "step": str(manifest["step"])}
        )
        path = out / "model.safetensors"
    elif fmt == "hf":
        if cfg.model.name != "gpt":
            raise ValueError(
                f"--format hf exports transformers models (model.name=gpt); {cfg.model.name} exports as safetensors or torchvision"
            )
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
        path = out
    else:
        if cfg.model.name != "resnet":
            raise ValueError(
                f"--format torchvision exports model.name=resnet; {cfg.model.name} exports as safetensors or hf"
            )
        path = out / "model.pt"
        torch.save(sd, path)
    log.info("exported %s (step %d) as %s to %s", ckpt, manifest["step"], fmt, path)
    return path
