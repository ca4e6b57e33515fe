"""The typed config tree: YAML file + dotted command-line overrides, validated by pydantic.

Precedence, written down once: command-line ``section.key=value`` > YAML file > field defaults.

Every field carries a one-line ``description``; ``distrain config reference`` prints them all as the
README's config reference. Unknown keys are errors that name the key, where it came from and the
closest valid key; bad values name the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-facing configuration error; the message says what is wrong and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), populate_by_name=True
    )


# --------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = Field("distrain", description="Run name; the default run directory is runs/<name>.")
    dir: str | None = Field(
        None, description="Run directory (config.yaml, metrics.jsonl, checkpoints). Default runs/<run.name>."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto picks cuda when a GPU is visible, else cpu."
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed for model init (the same on every rank), data order, and dropout/augmentation (seed + rank).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level of rank 0 (other ranks log warnings and errors only)."
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


# ------------------------------------------------------------------------------------------- model
_GPT_PRESETS: dict[str, dict[str, int]] = {
    # name: n_layer, n_head, d_model, d_ff (0 = arch default), n_kv_head (llama only; 0 = n_head)
    "tiny": dict(n_layer=2, n_head=4, d_model=64, d_ff=256, n_kv_head=0),
    "mini": dict(n_layer=4, n_head=8, d_model=256, d_ff=1024, n_kv_head=0),
    "small": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, n_kv_head=0),  # GPT-2 124M
    "medium": dict(n_layer=24, n_head=16, d_model=1024, d_ff=4096, n_kv_head=0),  # GPT-2 350M
    "large": dict(n_layer=36, n_head=20, d_model=1280, d_ff=5120, n_kv_head=0),  # GPT-2 774M
    "1b": dict(n_layer=16, n_head=32, d_model=2048, d_ff=8192, n_kv_head=8),  # Llama-3.2-1B shape
    "xl": dict(n_layer=48, n_head=25, d_model=1600, d_ff=6400, n_kv_head=0),  # GPT-2 1.5B
}


class _ModelCommon(Section):
    init_from: str | None = Field(
        None,
        description="Start from local weights: a HF model directory, a .safetensors file or a torch state-dict file (.pt/.pth, loaded weights_only).",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameter-name glob patterns (fnmatch) to freeze, e.g. ['transformer.h.0.*'].",
    )


class GPTModelConfig(_ModelCommon):
    name: Literal["gpt"] = Field(
        "gpt", description="Decoder-only causal LM built by transformers from a config (random init)."
    )
    arch: Literal["gpt2", "llama"] = Field(
        "gpt2",
        description="Architecture: gpt2 (learned positions, GELU MLP) or llama (RoPE, SwiGLU, RMSNorm, GQA).",
    )
    preset: Literal["tiny", "mini", "small", "medium", "large", "1b", "xl"] = Field(
        "tiny", description="Size preset; the fields below override single dimensions."
    )
    n_layer: int | None = Field(None, ge=1, description="Transformer blocks (default: from preset).")
    n_head: int | None = Field(None, ge=1, description="Attention heads (default: from preset).")
    n_kv_head: int | None = Field(
        None,
        ge=1,
        description="Key/value heads for grouped-query attention, llama only (default: from preset, else n_head).",
    )
    d_model: int | None = Field(None, ge=8, description="Hidden size (default: from preset).")
    d_ff: int | None = Field(None, ge=8, description="MLP inner size (default: from preset).")
    vocab_size: int = Field(
        512, ge=2, description="Vocabulary size; must cover the tokenizer's (byte tokenizer: 257)."
    )
    max_seq_len: int | None = Field(
        None, ge=1, description="Longest sequence the position embedding covers (default: data.seq_len)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the LM head.")

    @model_validator(mode="after")
    def _fill_preset(self) -> GPTModelConfig:
        p = _GPT_PRESETS[self.preset]
        for key in ("n_layer", "n_head", "d_model", "d_ff"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, p[key])
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", p["n_kv_head"] or self.n_head)
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})"
            )
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("model.n_kv_head applies to arch=llama only; remove it or set model.arch=llama")
        return self


class ResNetModelConfig(_ModelCommon):
    name: Literal["resnet"] = Field(
        "resnet", description="torchvision ResNet image classifier (random init)."
    )
    depth: Literal[18, 34, 50] = Field(18, description="ResNet depth: 18, 34 or 50.")
    num_classes: int = Field(10, ge=2, description="Output classes; must cover the data's labels.")
    image_size: int = Field(32, ge=8, description="Square input size the data is resized/cropped to.")
    in_channels: Literal[1, 3] = Field(
        3, description="Input channels (greyscale images are converted to this)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier head.")


class LSTMModelConfig(_ModelCommon):
    name: Literal["lstm"] = Field("lstm", description="Recurrent LM: embedding, nn.LSTM, linear head.")
    vocab_size: int = Field(
        512, ge=2, description="Vocabulary size; must cover the tokenizer's (byte tokenizer: 257)."
    )
    d_embed: int = Field(128, ge=1, description="Embedding size.")
    d_hidden: int = Field(256, ge=1, description="LSTM hidden size.")
    n_layer: int = Field(2, ge=1, description="Stacked LSTM layers.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout between LSTM layers and before the head."
    )
    tie_embeddings: bool = Field(
        False, description="Share the embedding with the head (needs d_embed == d_hidden)."
    )

    @model_validator(mode="after")
    def _tie_ok(self) -> LSTMModelConfig:
        if self.tie_embeddings and self.d_embed != self.d_hidden:
            raise ValueError(
                f"model.tie_embeddings needs model.d_embed ({self.d_embed}) == model.d_hidden ({self.d_hidden})"
            )
        return self


ModelConfig = Annotated[GPTModelConfig | ResNetModelConfig | LSTMModelConfig, Field(discriminator="name")]
MODEL_CLASSES: dict[str, type[Section]] = {
    "gpt": GPTModelConfig,
    "resnet": ResNetModelConfig,
    "lstm": LSTMModelConfig,
}


# -------------------------------------------------------------------------------------------- data
class SourceConfig(Section):
    path: str = Field(
        ..., description="A file, directory, glob or fsspec URL (s3://, gs://, hf://, file://, memory://)."
    )
    weight: float = Field(1.0, gt=0, description="Relative share of documents drawn from this source.")


class DataConfig(Section):
    train_path: str | None = Field(
        None,
        description="Training data: a file, directory, glob or fsspec URL (jsonl, txt, parquet, or an ImageFolder directory). Or use data.sources.",
    )
    sources: list[SourceConfig] | None = Field(
        None,
        description="Text only, instead of train_path: sources mixed per document by weight, e.g. [{path: a/*.jsonl, weight: 3}, {path: b.parquet, weight: 1}].",
    )
    eval_path: str | None = Field(None, description="Held-out data in the same format; no eval without it.")
    format: Literal["auto", "jsonl", "txt", "parquet", "imagefolder"] = Field(
        "auto",
        description="File format; auto infers it from the extension (a directory of class folders is an imagefolder). A txt file is one document.",
    )
    text_field: str = Field("text", description="Text column of jsonl/parquet rows.")
    image_field: str = Field(
        "image", description="Encoded-image column of parquet rows (bytes, or a {'bytes': ...} struct)."
    )
    label_field: str = Field("label", description="Integer class column of parquet rows.")
    tokenizer: str = Field(
        "bytes",
        description="'bytes' (built-in byte-level, 256 bytes + end-of-document = 257 ids) or a local HF tokenizer directory.",
    )
    seq_len: int = Field(128, ge=2, description="Tokens per packed training sequence (text).")
    shuffle: bool = Field(
        True,
        description="Shuffle each epoch, seeded by run.seed and epoch: text by file order and within blocks of shuffle_block rows, images by sample.",
    )
    shuffle_block: int = Field(
        1024,
        ge=1,
        description="Text: rows permuted together (a larger block mixes more; a resume re-reads at most one block).",
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes per rank for reading, decoding and tokenizing (0 = in the training process).",
    )
    prefetch_factor: int = Field(
        4, ge=1, description="Batches each worker prepares ahead (with num_workers > 0)."
    )
    pin_memory: bool | None = Field(
        None,
        description="Batches in page-locked host memory, copied to the GPU without blocking (unset: on for CUDA).",
    )
    engine: Literal["torch", "ray"] = Field(
        "torch",
        description="torch: DataLoader workers in each training process; ray: Ray Data actors read, decode and tokenize (Ray at RAY_ADDRESS, or a local one on 127.0.0.2).",
    )
    ray_actors: int = Field(
        1,
        ge=1,
        description="data.engine=ray: Ray Data actors (0.5 CPU each) preprocessing for each training process.",
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip",
        description="A malformed row, missing field, empty document or undecodable image: skip and count it (metrics.jsonl data_skipped_*), or stop the run naming the file and row.",
    )
    augment: bool = Field(
        True,
        description="Images: training augmentation (random resized crop, optional flip); eval always resizes and center-crops.",
    )
    crop_scale: tuple[float, float] = Field(
        (0.35, 1.0), description="Images: area range of the random resized crop."
    )
    hflip: bool = Field(
        True,
        description="Images: random horizontal flips in training (turn off for digits or text-like images).",
    )
    eval_resize_ratio: float = Field(
        1.0,
        ge=1.0,
        description="Images, eval: resize the shorter side to image_size x this, then center-crop image_size (ImageNet recipes use 1.14).",
    )
    mean: list[float] | None = Field(
        None,
        description="Images: per-channel normalisation mean (default: ImageNet's for RGB, 0.5 for greyscale).",
    )
    std: list[float] | None = Field(
        None,
        description="Images: per-channel normalisation std (default: ImageNet's for RGB, 0.5 for greyscale).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.train_path is None) == (self.sources is None):
            raise ValueError("set exactly one of data.train_path or data.sources")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources is empty; list at least one {path, weight}")
        if self.crop_scale[0] <= 0 or self.crop_scale[0] > self.crop_scale[1] or self.crop_scale[1] > 1:
            raise ValueError(f"data.crop_scale {list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
        return self


# ------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(8, ge=1, description="Samples per forward/backward on one worker.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step over all workers; must equal micro_batch_size x parallel.grad_accum x workers (default: that product).",
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="Evaluate every N steps and at the end (0 = only at the end; needs data.eval_path).",
    )
    eval_batches: int = Field(10, ge=1, description="Micro-batches per evaluation.")
    log_every: int = Field(
        10, ge=1, description="Write a metrics.jsonl record and a console line every N steps."
    )
    check_replicas: bool = Field(
        False,
        description="At the end, check that every rank holds identical parameters (gathered under ZeRO 3); a mismatch fails the run.",
    )


# ------------------------------------------------------------------------------------------- optim
class OptimConfig(Section):
    name: Literal["adamw", "adam"] = Field(
        "adamw", description="Optimizer: adamw (decoupled weight decay) or adam (L2 in the gradient)."
    )
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After warmup: cosine decay to min_lr_ratio x lr at the last step, or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    fused: bool | None = Field(
        None,
        description="torch's fused Adam(W) kernel as DeepSpeed's client optimizer (unset: on for CUDA; never with parallel.offload_optimizer, which steps with DeepSpeed's CPU Adam).",
    )


# ---------------------------------------------------------------------------------------- parallel
class ParallelConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO stage: 0 (DDP), 1 (optimizer states), 2 (+gradients), 3 (+parameters) sharded.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Training precision; bf16/fp16 keep fp32 master weights (fp16 on CUDA only, with dynamic loss scaling).",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this (0 = off).")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: keep optimizer states in CPU memory (CUDA, zero_stage >= 1)."
    )
    offload_params: bool = Field(
        False, description="ZeRO-Infinity: keep parameters in CPU memory (CUDA, zero_stage 3)."
    )
    mixed_precision: Literal["auto", "params", "autocast"] = Field(
        "auto",
        description="How bf16/fp16 is applied: params (DeepSpeed casts weights, fp32 master copy in the optimizer), autocast (fp32 weights, torch.autocast compute), auto = autocast for CNNs (BatchNorm statistics stay fp32), params otherwise.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (model.name=gpt)."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend of DeepSpeed's collectives: auto = nccl on CUDA, gloo on CPU (distrain's own small host-side collectives always use a gloo group of their own).",
    )
    loss_scale_power: int = Field(
        16,
        ge=0,
        le=40,
        description="fp16: dynamic loss scaling starts at 2**this, halves on an overflow (that step is skipped) and grows back.",
    )
    tf32: bool = Field(
        True,
        description="CUDA: TF32 tensor cores for fp32 matmuls and convolutions (no effect on bf16/fp16).",
    )
    cudnn_benchmark: bool | None = Field(
        None, description="CUDA: cuDNN autotunes convolution kernels (unset: on for image models)."
    )
    channels_last: bool | None = Field(
        None,
        description="NHWC memory format for CNN weights and inputs (unset: on for image models on CUDA).",
    )


# ------------------------------------------------------------------------------------- checkpoint
class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = off).")
    every_minutes: float = Field(
        0.0,
        ge=0.0,
        description="Save a checkpoint when this many minutes passed since the last one (0 = off).",
    )
    at_end: bool = Field(
        True,
        description="Save a checkpoint when training finishes or is stopped by Ctrl-C (SIGTERM/SIGUSR1 always save).",
    )
    keep_last: int = Field(
        0, ge=0, description="Keep the newest N checkpoints and delete older ones (0 = keep all)."
    )
    keep_every: int = Field(
        0,
        ge=0,
        description="With keep_last: also keep every checkpoint whose step is a multiple of this (0 = none).",
    )
    async_save: bool = Field(
        False,
        alias="async",
        description="Copy the state to host memory and write it in a background thread; training blocks only for the copy (a second save waits for the first).",
    )
    resume: bool = Field(
        True,
        description="Resume from the newest valid checkpoint in run.dir when there is one (false = refuse to reuse a run.dir that has checkpoints).",
    )


# ---------------------------------------------------------------------------------------- metrics
class MetricsConfig(Section):
    jsonl: bool = Field(True, description="Append one JSON object per log step to RUN_DIR/metrics.jsonl.")
    accounting: bool = Field(
        True,
        description="Step-time split, FLOPs, MFU and energy per record; false keeps loss, rates and data wait only.",
    )
    energy: bool = Field(
        True,
        description="Count energy: NVML on GPUs, RAPL on CPUs, else an estimate (cpu_watts x utilisation) labelled estimated.",
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Dense peak TFLOP/s of one device for MFU; unset: the GPU table (MFU null for GPUs not in it), a matmul probe on CPU.",
    )
    cpu_watts: float | None = Field(
        None,
        gt=0,
        description="A node's CPU power at full load, for the estimate where RAPL is unreadable; unset: 10 W per logical CPU.",
    )
    power_sample_s: float = Field(
        0.1, gt=0, description="Power sampling interval for GPUs without NVML's energy counter."
    )
    grid_g_per_kwh: float = Field(
        475.0,
        ge=0,
        description="Grid carbon intensity in g CO2e per kWh (default: IEA world average of electricity generation); set your region's.",
    )
    pue: float = Field(
        1.0,
        ge=1.0,
        description="Data-centre power usage effectiveness multiplying the measured energy (1.0 counts the machine only).",
    )


# --------------------------------------------------------------------------------------- tracking
class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None,
        description="W&B mode; unset: online when WANDB_API_KEY is set, else offline (a first run needs no account).",
    )
    project: str = Field("distrain", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); unset: the account's default.")
    group: str | None = Field(None, description="W&B group, e.g. a sweep or an experiment family.")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")
    name: str | None = Field(None, description="W&B run name; unset: run.name.")
    dir: str | None = Field(
        None, description="Directory W&B writes into (its wandb/ folder); unset: the run directory."
    )
    log_checkpoints: bool = Field(
        False,
        description="Log each checkpoint as a W&B artifact that references its directory (nothing is uploaded).",
    )
    init_timeout: float = Field(
        90.0, gt=0, description="Seconds wandb.init may take before W&B is given up for local logging."
    )


class TrackingConfig(Section):
    progress_bar: bool = Field(
        True, description="Show a progress bar with ETA on rank 0 when the console is a terminal."
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases.")


# ---------------------------------------------------------------------------------------- cluster
class ClusterConfig(Section):
    workers: int = Field(
        1,
        ge=1,
        description="Training processes (one per GPU on GPU clusters); `distrain train` runs one unless launched by torchrun.",
    )
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker asks for (0 on CPU).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker asks for.")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places workers over nodes (SPREAD: one per node where it can)."
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Ray restarts the worker group this many times after a worker dies (-1: without limit); each restart resumes from the newest checkpoint.",
    )
    address: str | None = Field(
        None,
        description="Ray cluster address for `distrain launch ray` (default: the RAY_ADDRESS environment variable).",
    )


class Config(Section):
    """The whole config tree."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name, directory, device, seed.")
    model: ModelConfig = Field(..., description="Which model and its shape.")
    data: DataConfig = Field(..., description="Where the data is and how it is read.")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Steps, batch sizes, eval and log cadence."
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="Optimizer and learning-rate schedule."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig, description="ZeRO stage, precision, accumulation, clipping, offload."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When checkpoints are saved."
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="What is measured and written.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Console and experiment tracking."
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Workers and resources for launchers."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        from distrain.models import get_spec  # local: models import torch

        kind = get_spec(self.model.name).batch_kind
        fmt = self.data.format
        if kind == "images" and fmt in ("jsonl", "txt"):
            raise ValueError(
                f"model.name={self.model.name} trains on images but data.format={fmt} is text; use imagefolder or parquet"
            )
        if self.data.engine == "ray" and self.data.sources is not None and len(self.data.sources) > 1:
            raise ValueError(
                "data.engine=ray reads one source; mix several with data.engine=torch, or merge them into one data.train_path"
            )
        if kind == "images" and self.data.sources is not None:
            raise ValueError("data.sources mixes text sources; for images set data.train_path")
        if (
            self.data.mean is not None
            and self.model.name == "resnet"
            and len(self.data.mean) != self.model.in_channels
        ):
            raise ValueError(
                f"data.mean has {len(self.data.mean)} values but model.in_channels={self.model.in_channels}"
            )
        if (
            self.data.std is not None
            and self.model.name == "resnet"
            and len(self.data.std) != self.model.in_channels
        ):
            raise ValueError(
                f"data.std has {len(self.data.std)} values but model.in_channels={self.model.in_channels}"
            )
        if kind == "tokens" and fmt == "imagefolder":
            raise ValueError(
                f"model.name={self.model.name} trains on text but data.format=imagefolder; use jsonl, txt or parquet"
            )
        if self.parallel.activation_checkpointing and self.model.name != "gpt":
            raise ValueError(
                f"parallel.activation_checkpointing is supported for model.name=gpt only (got {self.model.name}); set it to false"
            )
        if self.model.name == "gpt":
            max_len = self.model.max_seq_len or self.data.seq_len
            if self.data.seq_len > max_len:
                raise ValueError(
                    f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({max_len}); raise model.max_seq_len or lower data.seq_len"
                )
        if self.parallel.offload_params and self.parallel.zero_stage != 3:
            raise ValueError(
                f"parallel.offload_params needs parallel.zero_stage=3 (got {self.parallel.zero_stage})"
            )
        if self.parallel.offload_optimizer and self.optim.fused:
            raise ValueError(
                "optim.fused=true and parallel.offload_optimizer=true: offloaded optimizer states step on the CPU "
                "with DeepSpeed's CPU Adam; drop optim.fused (or set it to false)"
            )
        if self.parallel.offload_optimizer and self.parallel.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1 (got 0)")
        check_topology(self, self.cluster.workers)
        return self


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.train.micro_batch_size * cfg.parallel.grad_accum * world_size


def check_topology(cfg: Config, world_size: int) -> None:
    """Refuse a batch layout that does not multiply out, printing every factor."""
    want = cfg.train.global_batch_size
    have = global_batch(cfg, world_size)
    if want is not None and want != have:
        per = cfg.train.micro_batch_size * world_size
        hint = (
            f"set parallel.grad_accum={want // per}"
            if want % per == 0
            else "pick train.global_batch_size divisible by micro_batch_size x workers"
        )
        raise ValueError(
            f"train.global_batch_size={want} but train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"parallel.grad_accum={cfg.parallel.grad_accum} x world size {world_size} = {have}; {hint}, "
            "or drop train.global_batch_size"
        )


# ---------------------------------------------------------------------------------- loading / errors
def _valid_keys(cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in cls.model_fields.items()]


def _section_class(path: tuple[str, ...], data: dict) -> type[BaseModel] | None:
    """The pydantic class that owns the keys below ``path`` (the model section follows model.name)."""
    cls: type[BaseModel] = Config
    for part in path:
        if cls is Config and part == "model":
            name = (
                (data.get("model") or {}).get("name", "gpt") if isinstance(data.get("model"), dict) else "gpt"
            )
            cls = MODEL_CLASSES.get(name, GPTModelConfig)
            continue
        field = cls.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(options)}"


def _format_errors(err: ValidationError, data: dict, source: str, overridden: set[str]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # the discriminated union adds the tag ('model', 'gpt', ...): drop it
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_CLASSES:
            loc = [loc[0]] + loc[2:]
        key = ".".join(loc) if loc else "(top level)"
        if e["type"] == "union_tag_invalid":
            key = "model.name"
        where = f"command-line argument '{key}=...'" if key in overridden else source
        if e["type"] == "extra_forbidden":
            owner = _section_class(tuple(loc[:-1]), data)
            opts = [f for f in _valid_keys(owner)] if owner else []
            prefix = ".".join(loc[:-1])
            sugg = _closest(loc[-1], opts)
            if sugg.startswith("did you mean"):
                sugg = f"did you mean '{prefix + '.' if prefix else ''}{sugg.split(chr(39))[1]}'?"
            lines.append(f"unknown key '{key}' in {where}; {sugg}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}' in {source}")
        elif e["type"] == "union_tag_invalid":
            lines.append(
                f"model.name={e.get('ctx', {}).get('tag')!r} is not a known model ({where}); allowed: {', '.join(MODEL_CLASSES)}"
            )
        elif e["type"] == "union_tag_not_found":
            lines.append(
                f"missing required key 'model.name' in {source}; allowed: {', '.join(MODEL_CLASSES)}"
            )
        elif e["type"] == "value_error" and not e["loc"] or e["type"] == "value_error" and len(loc) <= 1:
            lines.append(f"{e['msg'].removeprefix('Value error, ')} ({source})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"key '{key}' = {e.get('input')!r} in {where}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(arg: str) -> tuple[list[str], Any]:
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"bad override '{arg}': write section.key=value, e.g. train.steps=50")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"bad override '{arg}': the key must be dotted, section.key=value (e.g. optim.lr=3e-4)"
        )
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override '{arg}': value is not valid YAML ({exc.problem})") from None
    return parts, value


def _set_override(data: dict, parts: list[str], value: Any, arg: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        cls = _section_class(tuple(parts[:i]), data)
        if cls is not None and part not in _valid_keys(cls):
            raise ConfigError(
                f"bad override '{arg}': unknown key '{'.'.join(parts[: i + 1])}'; {_closest(part, _valid_keys(cls))}"
            )
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"bad override '{arg}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    cls = _section_class(tuple(parts[:-1]), data)
    if cls is not None and parts[-1] not in _valid_keys(cls):
        prefix = ".".join(parts[:-1])
        sugg = _closest(parts[-1], _valid_keys(cls))
        if sugg.startswith("did you mean"):
            sugg = f"did you mean '{prefix}.{sugg.split(chr(39))[1]}'?"
        raise ConfigError(f"bad override '{arg}': unknown key '{'.'.join(parts)}'; {sugg}")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML ``path`` (may be None for overrides only), apply ``overrides``, validate."""
    data: dict = {}
    source = "the command line"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {path} not found; pass a YAML file such as configs/gpt-cpu-tiny.yaml"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
        data = loaded
    overridden: set[str] = set()
    for arg in overrides:
        parts, value = parse_override(arg)
        _set_override(data, parts, value, arg)
        overridden.add(".".join(parts))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, data, source, overridden)) from None


def config_from_yaml(text: str, source: str = "config") -> Config:
    """A config from YAML text written by ``to_yaml`` (what launchers hand to their workers)."""
    try:
        return Config.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, yaml.safe_load(text), source, set())) from None


def to_yaml(cfg: Config) -> str:
    data = cfg.model_dump(mode="json", by_alias=True)
    data["model"] = {"name": data["model"].pop("name"), **data["model"]}
    return yaml.safe_dump(data, sort_keys=False)


# What a resume may change (dotted keys or whole sections): how long and how the run goes on, where
# it reads and writes, how it is logged and launched. Anything else (the model, precision, ZeRO
# stage, optimizer, data format and tokenizer...) belongs to the checkpoint, and a change is refused.
RESUMABLE_KEYS = (
    "run.name",
    "run.dir",
    "run.log_level",
    "run.device",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.check_replicas",
    "train.global_batch_size",
    "optim.warmup_steps",
    "optim.fused",
    "data.train_path",
    "data.eval_path",
    "data.sources",
    "data.num_workers",
    "data.prefetch_factor",
    "data.pin_memory",
    "parallel.grad_accum",
    "parallel.backend",
    "parallel.tf32",
    "parallel.cudnn_benchmark",
    "parallel.channels_last",
    "checkpoint",
    "metrics",
    "tracking",
    "cluster",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(saved_yaml: str, cfg: Config) -> list[str]:
    """The keys, with both values, where ``cfg`` differs from a checkpoint's saved config in ways
    a resume may not change (``RESUMABLE_KEYS`` may)."""
    saved = _flatten(yaml.safe_load(saved_yaml))
    new = _flatten(yaml.safe_load(to_yaml(cfg)))
    out = []
    for key in sorted(set(saved) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        a, b = saved.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def reference_markdown() -> str:
    """The config reference (every key, type, default and its one-line doc) as markdown tables."""
    out = []
    sections: list[tuple[str, type[BaseModel]]] = []
    for name, field in Config.model_fields.items():
        if name == "model":
            sections += [(f"model (name: {k})", c) for k, c in MODEL_CLASSES.items()]
        else:
            sections.append((name, field.annotation))
    for title, cls in sections:
        out.append(f"### `{title}`\n\n| key | default | description |\n|---|---|---|")
        sec = title.split(" ")[0]

        def rows(prefix: str, cls: type[BaseModel]) -> None:
            for key, f in ((f.alias or k, f) for k, f in cls.model_fields.items()):
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                    rows(f"{prefix}.{key}", f.annotation)  # a nested section: its keys in full
                    continue
                default = (
                    "required"
                    if f.is_required()
                    else (f.default_factory() if f.default_factory else f.default)
                )
                out.append(f"| `{prefix}.{key}` | `{default!r}` | {f.description} |")

        rows(sec, cls)
        out.append("")
    return "\n".join(out)
