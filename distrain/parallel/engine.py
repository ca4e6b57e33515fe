"""The DeepSpeed config (ds_config) produced from the typed ``parallel`` and ``optim`` sections, and
the engine built from it."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from distrain.config import Config, global_batch

log = logging.getLogger(__name__)


def _scheduler(cfg: Config) -> dict[str, Any]:
    """Linear warmup from lr/(W+1) to lr over W steps (no step runs at lr 0), then cosine decay to
    ``min_lr_ratio`` x lr at the last step, or constant. DeepSpeed's schedules warm up over >= 2
    steps; W=0 starts at the full lr. DeepSpeed's schedulers start before their first step (lr 0
    for step 0), so ``build_engine`` advances a fresh scheduler once: step t then runs at ratio(t)."""
    o, steps = cfg.optim, cfg.train.steps
    w = o.warmup_steps
    start_ratio = 1.0 / (w + 1) if w > 0 else 1.0
    if o.schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": max(w, 1),
                "warmup_min_ratio": start_ratio,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    return {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": o.lr * start_ratio,
            "warmup_max_lr": o.lr,
            "warmup_num_steps": max(w, 1),
            "warmup_type": "linear",
        },
    }


def mixed_precision_mode(cfg: Config) -> str | None:
    """None for fp32, else 'params' or 'autocast' (auto: autocast for image models)."""
    p = cfg.parallel
    if p.precision == "fp32":
        return None
    if p.mixed_precision != "auto":
        return p.mixed_precision
    return "autocast" if cfg.model.batch_kind == "images" else "params"


def plain_torch_optimizer(cfg: Config) -> bool:
    """Whether DeepSpeed steps a plain torch optimizer (ZeRO 0 in fp32 or bf16 autocast), with no
    optimizer of its own around it: then distrain clips the gradients (with the norm it computes for
    ``train.on_nonfinite`` anyway) and skips non-finite steps. fp16 autocast is torch's GradScaler's."""
    return (
        cfg.parallel.zero_stage == 0
        and cfg.parallel.precision != "fp16"
        and mixed_precision_mode(cfg) != "params"
    )


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fused_optimizer(cfg: Config, device: torch.device) -> bool:
    """optim.fused resolved: torch's fused Adam(W) kernel, by default on CUDA, and on any device
    where DeepSpeed steps a plain torch optimizer (ZeRO 0 in fp32 or autocast): its ``found_inf``
    skips a non-finite step on the device (``train.on_nonfinite``). Never with offloaded optimizer
    states (ZeRO-Offload steps on the CPU with DeepSpeed's CPU Adam)."""
    if cfg.parallel.offload_optimizer or cfg.parallel.tensor_parallel > 1:
        return False  # AutoTP builds its shards inside deepspeed.initialize: DeepSpeed builds the optimizer
    if cfg.optim.fused is not None:
        return cfg.optim.fused
    return device.type == "cuda" or plain_torch_optimizer(cfg)


def channels_last(cfg: Config, device: torch.device) -> bool:
    """parallel.channels_last resolved: NHWC weights and inputs for CNNs on CUDA by default."""
    if cfg.model.batch_kind != "images":
        return False
    want = cfg.parallel.channels_last
    return device.type == "cuda" if want is None else want


class SkipNonFinite:
    """``train.on_nonfinite`` for a plain torch Adam(W), the optimizer DeepSpeed steps as it is
    (``plain_torch_optimizer``): each step computes the total gradient norm once, clips with it
    (``parallel.grad_clip``; DeepSpeed's clipping is off there) and updates nothing when it is not
    finite. The fused kernel is told on the device through ``found_inf`` (torch's GradScaler
    protocol: the weights, the moments and the step count stay as they were), so no step reads a
    value back to the host; unfused (``optim.fused=false``) the flag is read on the host every
    step and the step is sat out. The norm is ``_global_grad_norm``, which DeepSpeed's engine
    takes after each step (``engine.get_global_grad_norm()``), as it does from its own optimizers."""

    def __init__(self, params, *, clip: float, **kwargs):
        super().__init__(params, **kwargs)
        self.clip = clip
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self._found = torch.zeros((), device=first.device if first is not None else "cpu")
        if self.defaults.get("fused"):
            self.found_inf = self._found  # read by torch's fused Adam(W) kernel at every step
        self._global_grad_norm: torch.Tensor | None = None

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self._found.device)
        self._found.copy_(~torch.isfinite(norm))
        if self.clip > 0 and grads:  # torch's clip_grad_norm_, with the norm already computed
            torch.nn.utils.clip_grads_with_norm_(grads, self.clip, norm)
        self._global_grad_norm = norm
        if self.defaults.get("fused") or not bool(self._found):  # unfused: a host read
            return super().step(closure)
        return None


class _SkipNonFiniteAdamW(SkipNonFinite, torch.optim.AdamW):
    pass


class _SkipNonFiniteAdam(SkipNonFinite, torch.optim.Adam):
    pass


def _client_optimizer(cfg: Config, fused: bool, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """torch's Adam(W) over DeepSpeed's parameter groups (after AutoTP's sharding: DeepSpeed calls
    this inside ``deepspeed.initialize``), fused or not; DeepSpeed wraps it for ZeRO, mixed
    precision and the ds_config schedule as it does its own. Where DeepSpeed steps it as it is
    (``plain_torch_optimizer``) it is a ``SkipNonFinite`` one."""
    o = cfg.optim
    kwargs: dict[str, Any] = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True if fused else None)
    if plain_torch_optimizer(cfg):
        cls: type = _SkipNonFiniteAdamW if o.name == "adamw" else _SkipNonFiniteAdam
        return cls(groups, clip=cfg.parallel.grad_clip, **kwargs)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, **kwargs)


def build_ds_config(
    cfg: Config, world_size: int, has_batchnorm: bool = False, client_optimizer: bool = False
) -> dict[str, Any]:
    """The ds_config; ``client_optimizer``: distrain builds the optimizer (``_client_optimizer``),
    so the ds_config names none."""
    p, o, t = cfg.parallel, cfg.optim, cfg.train
    torch_adam = not p.offload_optimizer  # ZeRO-Offload: DeepSpeed's CPU Adam steps the CPU states
    ds: dict[str, Any] = {
        # DeepSpeed's check divides the world by sequence_parallel_size only: AutoTP ranks count
        # as data-parallel in it
        "train_batch_size": global_batch(cfg, world_size) * p.tensor_parallel,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        # DeepSpeed's own default is 1.0: always write it; 0 where distrain clips (plain_torch_optimizer)
        "gradient_clipping": 0.0 if plain_torch_optimizer(cfg) else p.grad_clip,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW" if o.name == "adamw" else "Adam",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch's Adam(W): no fused_adam C++ build, identical results
                **({"torch_adam": True} if torch_adam else {}),
                **({"adam_w_mode": False} if o.name == "adam" else {}),
            },
        },
        "scheduler": _scheduler(cfg),
        "zero_optimization": {"stage": p.zero_stage},
    }
    if p.sequence_parallel > 1:  # the batch size check's dp; no mpu (``parallel.sequence``)
        ds["sequence_parallel_size"] = p.sequence_parallel
    if p.tensor_parallel > 1:
        ds["tensor_parallel"] = {"autotp_size": p.tensor_parallel}
    if client_optimizer:
        del ds["optimizer"]
    if p.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p.offload_params:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    mode = mixed_precision_mode(cfg)
    if mode == "autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if p.precision == "bf16" else "float16"}
    elif mode == "params":
        if p.precision == "bf16":
            ds["bf16"] = {"enabled": True}
        else:
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": p.loss_scale_power}
        if has_batchnorm:  # DeepSpeed casts parameters only; BatchNorm statistics must follow
            ds["data_types"] = {"buffer_dtype": "bf16" if p.precision == "bf16" else "fp16"}
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never biases or norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_engine(
    cfg: Config,
    model: nn.Module,
    world_size: int,
    device: torch.device,
    load_universal: bool = False,
):
    """Wrap ``model`` in a DeepSpeed engine for ``device``; returns the engine (optimizer and
    schedule inside). AutoTP (``parallel.tensor_parallel``) is DeepSpeed's own, from the ds_config;
    the sequence-parallel attention is registered before (``parallel.sequence``)."""
    import deepspeed

    if channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    fused = fused_optimizer(cfg, device)
    # distrain builds the optimizer where it is torch's fused kernel or where DeepSpeed steps it
    # as it is (the non-finite gate, ``SkipNonFinite``); else DeepSpeed builds it from the ds_config
    own = fused or plain_torch_optimizer(cfg)
    ds_config = build_ds_config(cfg, world_size, has_batchnorm=_has_batchnorm(model), client_optimizer=own)
    if load_universal:  # resuming a checkpoint saved at another world size
        ds_config["checkpoint"] = {"load_universal": True}
    # a callable: DeepSpeed builds it from the parameter groups once the module is on the device
    # and AutoTP has sharded it (and ZeRO swaps in its own flat partitions)
    optimizer = functools.partial(_client_optimizer, cfg, fused) if own else None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        optimizer=optimizer,
        config=ds_config,
    )
    engine.lr_scheduler.step()  # see _scheduler: step 0 trains at the schedule's first lr, not 0
    if cfg.parallel.compile:
        # DeepSpeed's own entry point: nn.Module.compile() on the module it wraps, in place, so the
        # ZeRO hooks, state_dict names and every file written stay those of the eager module (a
        # torch.compile wrapper made before deepspeed.initialize would prefix them with _orig_mod.)
        engine.compile(backend="inductor")
    return engine


class Frozen:
    """A part of a model of several, called inside another part's update: its module, with its
    engine's autocast, but not through its engine. DeepSpeed hooks every engine forward's outputs
    for that engine's backward (its ZeRO bookkeeping, and the gradient divided by its accumulation
    steps), so a gradient that flows through another engine's outputs into the part being updated
    would run that engine's backward on the way and arrive scaled; the module alone carries none
    of that. Its parameters are frozen while the update runs (``Trainer``)."""

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module

    def __call__(self, *args, **kwargs):
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        with autocast_if_enabled(self.engine):
            return self.module(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()
