"""The config schema: the sections of the config tree and their validators (pydantic).

Every field carries a one-line ``description``; ``distrain config reference`` prints them all as the
config reference page (docs/reference/config.md). The ``model`` section is the config class of the model ``model.name``
names (each model's own rules live on its class), found by name in ``distrain.catalog``: the named
model's module is imported when a config names it, never at import time. Nothing here imports torch
or builds anything.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from distrain.catalog import MODELS
from distrain.errors import TopologyError


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), populate_by_name=True
    )


class ModelSection(Section):
    """Base of every model's config class (one per model file, beside its ``ModelSpec``).

    A model of ``batch_kind`` "tokens" has a ``vocab_size`` field (the data checks the tokenizer
    against it); one of "images" has ``num_classes``, ``image_size`` and ``in_channels`` (the data
    decodes and checks labels by them)."""

    batch_kind: ClassVar[Literal["tokens", "images"]] = "tokens"
    activation_checkpointing: ClassVar[bool] = False
    """Whether ``parallel.activation_checkpointing`` applies to this model."""
    parts: ClassVar[tuple[str, ...]] = ("model",)
    """The model's parts, each trained by an engine (and optimizer) of its own; ``optim.<part>``
    overrides ``optim`` for one of several."""
    zero3: ClassVar[str | None] = None
    """Why ``parallel.zero_stage=3`` cannot train this model (None: it can)."""
    splits: ClassVar[str | None] = "it has no attention heads to split"
    """Why ``parallel.sequence_parallel``/``tensor_parallel`` cannot split this model (None: they
    can; the model's ``check`` holds its own rules on heads and lengths)."""

    name: str = Field(..., description="Which registered model.")
    init_from: str | None = Field(
        None,
        description="Start from local weights: a HF model directory, a .safetensors file or a torch state-dict file (.pt/.pth, loaded weights_only).",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameter-name glob patterns (fnmatch) to freeze, e.g. ['transformer.h.0.*'].",
    )

    def check(self, cfg: Config) -> None:
        """Rules between this model and other sections (raise ValueError naming keys and the fix)."""

    @classmethod
    def enroll(cls) -> None:
        """Make ``model.name`` take this class's name, validated by this class, in this process (the
        model registry's ``register`` calls it for a model defined outside ``distrain.catalog``)."""
        _ENROLLED[cls.model_fields["name"].default] = cls


_ENROLLED: dict[str, type[ModelSection]] = {}  # model.name -> config class, added by ModelSection.enroll


def model_names(shipped: bool = False) -> list[str]:
    """The names ``model.name`` takes: the shipped ones (``shipped``), or also those enrolled in this
    process."""
    extra = [] if shipped else [n for n in _ENROLLED if n not in MODELS]
    return [*MODELS, *extra]


def model_config_class(name: str) -> type[ModelSection]:
    """The config class of the model ``name`` (a shipped model's module is imported on first use)."""
    if name in _ENROLLED:
        return _ENROLLED[name]
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a known model; allowed: {', '.join(model_names())}")
    return importlib.import_module(MODELS[name]).SPEC.config


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
        description="Seed for model init (the same on every rank), data order, image augmentation (per sample, from seed, epoch, file and row) and dropout (seed + rank).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level of rank 0 (other ranks log warnings and errors only)."
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


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
    format: Literal["auto", "jsonl", "txt", "parquet", "imagefolder", "hf"] = Field(
        "auto",
        description="File format; auto infers it from the extension (a directory of class folders is an imagefolder, a save_to_disk directory is hf). A txt file is one document. hf: a Hugging Face datasets save_to_disk directory, or a dataset name or local data directory loaded with datasets.load_dataset from the local cache.",
    )
    split: str = Field(
        "train", description="format hf: the split of a DatasetDict (or of load_dataset) to train on."
    )
    eval_split: str = Field("validation", description="format hf: the split data.eval_path is read from.")
    partitions: int | None = Field(
        None,
        ge=1,
        description="Canonical partitions of the data order (each rank reads partitions / world size of them, front to back). Fixed for a run: it must divide by every world size the run is resumed on. Unset: derived at the first launch as the smallest multiple of 64 that every world size the launch may use divides (24 GPUs: 192, resumable on 8, 12, 24 or 48), fewer for a small source, and recorded with the run.",
    )
    restart_order: bool = Field(
        False,
        description="Resume from a checkpoint whose data position this run cannot continue (saved by another data-state version, or for other data, partitions, shuffle or seed) by restarting the data order at the start of the epoch it had reached, instead of refusing; the run records it (summary.json data_restarts, a warning).",
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
        description="Shuffle each epoch, seeded by run.seed and epoch: the file order (an ImageFolder's images are its files) and rows within blocks of shuffle_block.",
    )
    shuffle_block: int = Field(
        1024,
        ge=1,
        description="Rows of a partition permuted together (a larger block mixes more; a resume re-reads at most one block per partition).",
    )
    shuffle_block_mb: float | None = Field(
        1.0,
        gt=0,
        description="Bytes (MiB) of a source's rows a shuffle block holds at most, from the source's mean row size: a source of large rows (images) gets blocks of fewer than shuffle_block rows, so a rank holds about shuffle_block_mb per partition it reads. null: shuffle_block rows whatever their size.",
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
        description="torch: DataLoader workers (or a thread) in each training process; ray: Ray actors decode and tokenize (Ray at RAY_ADDRESS, or a local one on 127.0.0.2). The order and position are the same for both.",
    )
    ray_actors: int = Field(
        1,
        ge=1,
        description="data.engine=ray: Ray actors (0.5 CPU each) tokenizing or decoding for each training process.",
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
    on_nonfinite: Literal["skip", "stop"] = Field(
        "stop",
        description="A step whose loss or gradients are not finite updates nothing (weights, optimizer state) and is counted (metrics.jsonl nonfinite_steps); stop: end the run after train.max_nonfinite_steps such steps in a row (checked on log steps), skip: go on.",
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="With train.on_nonfinite=stop: consecutive skipped steps that end the run."
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
        description="torch's fused Adam(W) kernel as DeepSpeed's client optimizer (unset: on for CUDA, and at ZeRO 0 in fp32 or autocast on any device, where it skips non-finite steps on the device; never with parallel.offload_optimizer, which steps with DeepSpeed's CPU Adam).",
    )
    model_config = ConfigDict(
        extra="allow", validate_assignment=True, protected_namespaces=(), populate_by_name=True
    )

    @model_validator(mode="after")
    def _part_overrides(self) -> OptimConfig:
        """``optim.<part>``: a section of overrides for one part of a model of several (the part's
        name is checked against the model in ``Config``); any other key is unknown."""
        import difflib

        for key, value in list((self.__pydantic_extra__ or {}).items()):
            if isinstance(value, OptimPartConfig):
                continue
            if not isinstance(value, dict):
                match = difflib.get_close_matches(key, list(OptimConfig.model_fields), n=1)
                hint = f"did you mean 'optim.{match[0]}'?" if match else "see `distrain config reference`"
                raise ValueError(
                    f"unknown key 'optim.{key}'; {hint} (a section optim.<part> holds one part's overrides)"
                )
            self.__pydantic_extra__[key] = OptimPartConfig.model_validate(value)
        return self

    @property
    def part_overrides(self) -> dict[str, OptimPartConfig]:
        return dict(self.__pydantic_extra__ or {})


class OptimPartConfig(Section):
    """``optim.<part>``: one part's optimizer, schedule and clipping, over ``optim`` (and
    ``parallel.grad_clip``); unset keys take those."""

    name: Literal["adamw", "adam"] | None = Field(None, description="This part's optim.name.")
    lr: float | None = Field(None, gt=0.0, description="This part's optim.lr.")
    weight_decay: float | None = Field(None, ge=0.0, description="This part's optim.weight_decay.")
    betas: tuple[float, float] | None = Field(None, description="This part's optim.betas.")
    eps: float | None = Field(None, gt=0.0, description="This part's optim.eps.")
    schedule: Literal["cosine", "constant"] | None = Field(None, description="This part's optim.schedule.")
    warmup_steps: int | None = Field(None, ge=0, description="This part's optim.warmup_steps.")
    min_lr_ratio: float | None = Field(None, ge=0.0, le=1.0, description="This part's optim.min_lr_ratio.")
    grad_clip: float | None = Field(None, ge=0.0, description="This part's parallel.grad_clip.")


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
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="Ulysses sequence parallelism (DeepSpeed ALST): each sequence is split over this many ranks, which trade attention heads by all-to-all; divides activations by it (model.name=gpt, arch=llama).",
    )
    tensor_parallel: int = Field(
        1,
        ge=1,
        description="Tensor parallelism (DeepSpeed AutoTP): each layer's weights are split over this many ranks; divides weights, gradients and optimizer states by it (model.name=gpt, arch=llama, zero_stage 1 or 2).",
    )
    compile: bool = Field(
        False,
        description="Compile the model's forward and backward with torch.compile (inductor, CPU and CUDA) through DeepSpeed's engine.compile(), which compiles the module in place: parameter names, checkpoints and exports are unchanged. The first steps are slower while the graphs compile.",
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
    sample_scorer: str | None = Field(
        None,
        description="Generative models: the run directory of an image classifier trained by distrain (model.name=resnet, on the same kind of images) that scores the generated samples at each eval: metrics.jsonl sample_confidence (its mean top-class probability) and sample_class_entropy (the entropy of its class histogram, nats).",
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
class SlurmConfig(Section):
    nodes: int = Field(1, ge=1, description="Nodes to allocate (`distrain submit slurm --nodes`).")
    gpus_per_node: int = Field(
        0, ge=0, description="GPUs per node; one Ray worker (rank) per GPU, or one per node without GPUs."
    )
    cpus_per_task: int = Field(
        2, ge=1, description="CPUs of the one task per node (Ray's node, or `distrain train`)."
    )
    time: str = Field(
        "01:00:00", description="Wall-clock limit, as sbatch --time (e.g. 30, 4:00:00, 2-00:00:00)."
    )
    partition: str | None = Field(None, description="sbatch --partition.")
    account: str | None = Field(None, description="sbatch --account.")
    qos: str | None = Field(None, description="sbatch --qos.")
    constraint: str | None = Field(None, description="sbatch --constraint.")
    launcher: Literal["auto", "ray", "train"] = Field(
        "auto",
        description="ray: a Ray head on the first node and a worker on each other node, then `distrain launch ray`; train: `srun distrain train` on one node (torchrun over its GPUs when it has several); auto: ray for more than one node.",
    )
    grace_s: int = Field(
        120,
        ge=0,
        description="Slurm signals the job this many seconds before its time limit (--signal=B:USR1@grace_s; Slurm may send it up to a minute early); the run checkpoints and requeues. 0: no signal (the trainer still checkpoints before the limit from its step and save times).",
    )
    max_requeues: int = Field(
        5, ge=0, description="A preempted or timed-out job requeues itself at most this many times."
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before anything else on the job (e.g. `module load cuda`, `source .venv/bin/activate`).",
    )
    sbatch: list[str] = Field(
        default_factory=list,
        description="Extra #SBATCH options, one per item (e.g. `--mem=0`, `--exclusive`).",
    )
    ray_node_ip: str | None = Field(
        None,
        description="Shell expression for the address a node's Ray binds (default: the node's address by `hostname -I`); on one machine give each node its own, e.g. `127.0.0.$((2 + SLURM_NODEID))`.",
    )
    ready_timeout_s: int = Field(
        300, ge=10, description="How long the job waits for every Ray node to join before failing."
    )

    @field_validator("time", mode="before")
    @classmethod
    def _time_text(cls, v):
        return str(v) if isinstance(v, int) else v


class WorkerRange(Section):
    """An elastic job's sizes: Ray Train runs as many workers as fit, from ``min`` to ``max``."""

    min: int = Field(..., ge=1, description="The fewest workers the job trains on (it waits below that).")
    max: int = Field(..., ge=1, description="The most workers the job trains on.")

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"cluster.workers: min={self.min} is above max={self.max}; swap them")
        return self


class ClusterConfig(Section):
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig, description="`distrain submit slurm`: the allocation and its job script."
    )
    workers: int | WorkerRange = Field(
        1,
        description="Training processes (one per GPU on GPU clusters), or an elastic range {min: M, max: N} for Ray launches (the job shrinks when nodes go and grows when they return; train.global_batch_size stays fixed and parallel.grad_accum is derived for each size); `distrain train` runs one unless launched by torchrun.",
    )
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker asks for (0 on CPU).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker asks for.")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places workers over nodes (SPREAD: one per node where it can)."
    )
    max_failures: int | None = Field(
        None,
        ge=-1,
        description="Ray restarts the worker group this many times after a worker dies (-1: without limit); each restart resumes from the newest checkpoint. Unset: 0 for a fixed number of workers, -1 for an elastic range (a lost node is a restart).",
    )
    resize_check_s: float = Field(
        60.0,
        gt=0,
        description="Elastic range: how often Ray checks whether more workers fit while the job runs (a grow waits up to this long, plus Ray's 20 s resource refresh).",
    )
    start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long Ray Train waits for a worker group to start before it tries again (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, which wins when set). After a lost node an elastic job may first ask for its old size (Ray's view of free resources lags up to 20 s) and waits this long before trying the size that fits.",
    )
    resize_save_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Elastic range: before Ray resizes a running group it waits this long for the workers to finish their step and save (then resizes anyway, losing the steps since the last checkpoint).",
    )
    address: str | None = Field(
        None,
        description="Ray cluster address for `distrain launch ray` (default: the RAY_ADDRESS environment variable).",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_positive(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"cluster.workers={v}: at least 1 (or a range {{min: M, max: N}})")
        return v

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, WorkerRange)

    @property
    def min_workers(self) -> int:
        return self.workers.min if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers.max if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def failures(self) -> int:
        """``max_failures`` as Ray takes it (its default resolved)."""
        if self.max_failures is not None:
            return self.max_failures
        return -1 if self.elastic else 0


class Config(Section):
    """The whole config tree."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name, directory, device, seed.")
    model: SerializeAsAny[ModelSection] = Field(..., description="Which model and its shape.")
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

    @field_validator("model", mode="wrap")
    @classmethod
    def _model_section(cls, value: Any, handler) -> ModelSection:
        """Validate the model section with the config class of the model it names."""
        if isinstance(value, ModelSection):
            return value
        if not isinstance(value, dict):
            return handler(value)
        if "name" not in value:
            raise ValueError(f"missing required key 'model.name'; allowed: {', '.join(model_names())}")
        return model_config_class(value["name"]).model_validate(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        kind, fmt, d, p = self.model.batch_kind, self.data.format, self.data, self.parallel
        if kind == "images" and fmt in ("jsonl", "txt"):
            raise ValueError(
                f"model.name={self.model.name} trains on images but data.format={fmt} is text; use imagefolder or parquet"
            )
        if kind == "tokens" and fmt == "imagefolder":
            raise ValueError(
                f"model.name={self.model.name} trains on text but data.format=imagefolder; use jsonl, txt or parquet"
            )
        if kind == "images" and d.sources is not None:
            raise ValueError("data.sources mixes text sources; for images set data.train_path")
        if p.activation_checkpointing and not self.model.activation_checkpointing:
            raise ValueError(
                f"parallel.activation_checkpointing is not supported by model.name={self.model.name}; set it to false"
            )
        if p.offload_params and p.zero_stage != 3:
            raise ValueError(f"parallel.offload_params needs parallel.zero_stage=3 (got {p.zero_stage})")
        if p.offload_optimizer and self.optim.fused:
            raise ValueError(
                "optim.fused=true and parallel.offload_optimizer=true: offloaded optimizer states step on the CPU "
                "with DeepSpeed's CPU Adam; drop optim.fused (or set it to false)"
            )
        if p.offload_optimizer and p.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1 (got 0)")
        self._check_parts()
        self._check_splits()
        self.model.check(self)
        group = p.sequence_parallel * p.tensor_parallel
        if self.cluster.elastic:
            check_sizes(self)
        elif self.cluster.workers % group == 0:
            check_topology(self, self.cluster.workers)  # else a launch checks the world size it has
        return self

    def _check_parts(self) -> None:
        import difflib

        parts, m = self.model.parts, self.model
        for key in self.optim.part_overrides:
            if len(parts) == 1 or key not in parts:
                match = difflib.get_close_matches(key, [*parts, *OptimConfig.model_fields], n=1)
                hint = f"did you mean 'optim.{match[0]}'?" if match else ""
                raise ValueError(
                    f"unknown key 'optim.{key}': model.name={m.name} has "
                    + (
                        f"the parts {', '.join(parts)}"
                        if len(parts) > 1
                        else "one part, set by optim.* itself"
                    )
                    + (f"; {hint}" if hint else "")
                )
        if len(parts) > 1 and (m.init_from or m.freeze):
            raise ValueError(
                f"model.init_from and model.freeze apply to a one-part model; model.name={m.name} has the parts "
                f"{', '.join(parts)}: drop them"
            )
        if self.parallel.zero_stage == 3 and m.zero3:
            raise ValueError(
                f"parallel.zero_stage=3 cannot train model.name={m.name}: {m.zero3}; use 0, 1 or 2"
            )

    def _check_splits(self) -> None:
        p, m = self.parallel, self.model
        for key, n in (("sequence_parallel", p.sequence_parallel), ("tensor_parallel", p.tensor_parallel)):
            if n > 1 and m.splits:
                raise ValueError(
                    f"parallel.{key}={n} cannot split model.name={m.name}: {m.splits}; set parallel.{key}=1"
                )
        if p.sequence_parallel > 1 and p.tensor_parallel > 1:
            raise ValueError(
                f"parallel.sequence_parallel={p.sequence_parallel} with parallel.tensor_parallel={p.tensor_parallel}: "
                "DeepSpeed's Ulysses groups and AutoTP groups do not compose in one engine; use one of them "
                "(ZeRO shards the rest over the data-parallel ranks)"
            )
        if p.tensor_parallel > 1 and self.optim.fused:
            raise ValueError(
                f"optim.fused=true with parallel.tensor_parallel={p.tensor_parallel}: AutoTP shards the layers inside "
                "deepspeed.initialize, so DeepSpeed builds the optimizer over the shards; drop optim.fused"
            )
        if p.tensor_parallel > 1 and p.zero_stage == 3:
            raise ValueError(
                f"parallel.tensor_parallel={p.tensor_parallel} runs at parallel.zero_stage 0, 1 or 2 (DeepSpeed's "
                "AutoTP training does not shard parameters with ZeRO 3); set parallel.zero_stage=2, or "
                "parallel.tensor_parallel=1 to shard the layers with ZeRO 3 instead"
            )

    def for_part(self, part: str) -> Config:
        """The config one part's engine is built from: ``optim`` with ``optim.<part>`` over it, and
        its ``grad_clip`` as ``parallel.grad_clip`` (the config itself for a part without overrides)."""
        over = self.optim.part_overrides.get(part)
        if over is None:
            return self
        keys = over.model_dump(exclude_none=True)
        clip = keys.pop("grad_clip", None)
        base = {k: v for k, v in self.optim.model_dump().items() if k in OptimConfig.model_fields}
        optim = OptimConfig.model_validate({**base, **keys})
        parallel = self.parallel if clip is None else self.parallel.model_copy(update={"grad_clip": clip})
        return self.model_copy(update={"optim": optim, "parallel": parallel})


def mesh(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(dp, sp, tp) with dp x sp x tp = world size; refuses a world size that sp x tp does not
    divide. The ranks of one sequence- or tensor-parallel group are consecutive (DeepSpeed's
    groups), so a rank's data-parallel rank is rank // (sp x tp)."""
    sp, tp = cfg.parallel.sequence_parallel, cfg.parallel.tensor_parallel
    if world_size % (sp * tp):
        raise TopologyError(
            f"world size {world_size} is not divisible by parallel.sequence_parallel={sp} x "
            f"parallel.tensor_parallel={tp} = {sp * tp}: the ranks form groups of {sp * tp}; run on a "
            f"multiple of {sp * tp} ranks, or lower parallel.sequence_parallel / parallel.tensor_parallel"
        )
    return world_size // (sp * tp), sp, tp


def mesh_line(cfg: Config, world_size: int) -> str:
    dp, sp, tp = mesh(cfg, world_size)
    return f"mesh dp {dp} x sp {sp} x tp {tp} = {world_size} rank(s)"


def mesh_summary(cfg: Config) -> str:
    """The mesh at cluster.workers (each end of an elastic range), or, where sp x tp does not divide
    it (a torchrun launch sets its own world size), the group size every world size must divide by."""
    group = cfg.parallel.sequence_parallel * cfg.parallel.tensor_parallel
    sizes = sorted({cfg.cluster.min_workers, cfg.cluster.max_workers})
    if all(n % group == 0 for n in sizes):
        return "; ".join(mesh_line(cfg, n) for n in sizes)
    return (
        f"mesh dp x sp {cfg.parallel.sequence_parallel} x tp {cfg.parallel.tensor_parallel}: runs on a multiple of "
        f"{group} ranks (cluster.workers={cfg.cluster.workers} is not one: set it for a Ray launch)"
    )


def dp_size(cfg: Config, world_size: int) -> int:
    """Data-parallel replicas at ``world_size`` ranks: the ranks of one SP or TP group share a batch."""
    return mesh(cfg, world_size)[0]


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step: micro batch x grad_accum x data-parallel size."""
    return cfg.train.micro_batch_size * cfg.parallel.grad_accum * dp_size(cfg, world_size)


def elastic_global_batch(cfg: Config) -> int:
    """An elastic job's samples per optimizer step, the same at every size: train.global_batch_size,
    or micro batch x parallel.grad_accum x the range's max."""
    if cfg.train.global_batch_size is not None:
        return cfg.train.global_batch_size
    group = cfg.parallel.sequence_parallel * cfg.parallel.tensor_parallel
    return cfg.train.micro_batch_size * cfg.parallel.grad_accum * max(1, cfg.cluster.max_workers // group)


def size_problem(cfg: Config, world_size: int, partitions: int | None = None) -> str | None:
    """Why an elastic job cannot train on ``world_size`` workers, or None: sp x tp divides it, the
    global batch is micro batch x a whole grad_accum x the data-parallel size, and the data
    partitions divide among the data-parallel ranks (at least data.num_workers each)."""
    want, micro = elastic_global_batch(cfg), cfg.train.micro_batch_size
    k = partitions if partitions is not None else cfg.data.partitions
    group = cfg.parallel.sequence_parallel * cfg.parallel.tensor_parallel
    if world_size % group:
        return f"{world_size} is not divisible by sequence_parallel x tensor_parallel = {group}"
    dp = world_size // group
    of = f"{dp} data-parallel ranks" if group > 1 else f"{dp}"
    if want % (micro * dp):
        return f"{want} samples are not micro batch {micro} x a whole grad_accum x {of}"
    if k is not None and k % dp:
        return f"data.partitions={k} is not divisible by {of}"
    if k is not None and cfg.data.engine == "torch" and cfg.data.num_workers > k // dp:
        return (
            f"each rank would read {k // dp} partitions, fewer than data.num_workers={cfg.data.num_workers}"
        )
    return None


def elastic_sizes(cfg: Config, partitions: int | None = None) -> tuple[list[int], dict[int, str]]:
    """(the sizes of cluster.workers' range that keep the global batch, {size: why not} for the rest)."""
    ok, bad = [], {}
    for n in range(cfg.cluster.min_workers, cfg.cluster.max_workers + 1):
        why = size_problem(cfg, n, partitions)
        if why:
            bad[n] = why
        else:
            ok.append(n)
    return ok, bad


def sized_for(cfg: Config, world_size: int) -> Config:
    """An elastic job's config at ``world_size`` workers: parallel.grad_accum derived from the fixed
    global batch (global = micro x grad_accum x world size); a fixed-size config as it is."""
    if not cfg.cluster.elastic:
        return cfg
    why = size_problem(cfg, world_size)
    if why:
        raise TopologyError(f"cluster.workers: this job cannot train on {world_size} workers: {why}")
    accum = elastic_global_batch(cfg) // (cfg.train.micro_batch_size * dp_size(cfg, world_size))
    return cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"grad_accum": accum})})


def elastic_layouts(cfg: Config, partitions: int | None = None) -> str:
    """The batch layout at each size of an elastic range (one line)."""
    ok, _ = elastic_sizes(cfg, partitions)
    micro = cfg.train.micro_batch_size
    return f"elastic: global batch {elastic_global_batch(cfg)} at every size: " + ", ".join(
        f"{n} workers x micro batch {micro} x grad_accum {sized_for(cfg, n).parallel.grad_accum}" for n in ok
    )


def _fixes(cfg: Config, bad: dict[int, str]) -> list[str]:
    """The smallest global batch and partition count, at least the current ones, that every size of
    the range keeps (only those that are at fault)."""
    import math

    lcm = math.lcm(*range(cfg.cluster.min_workers, cfg.cluster.max_workers + 1))
    out = []
    if any("samples are not" in why for why in bad.values()):
        step = cfg.train.micro_batch_size * lcm
        if step > 16 * elastic_global_batch(cfg):  # a wide range: no batch near this one fits every size
            return []
        out.append(f"train.global_batch_size={-(-elastic_global_batch(cfg) // step) * step}")
    k = next((int(why.split("=")[1].split()[0]) for why in bad.values() if "data.partitions=" in why), None)
    if k is not None:
        out.append(f"data.partitions={-(-k // lcm) * lcm} (a multiple of every size)")
    if not out and any("data.num_workers" in why for why in bad.values()):
        out.append(f"data.num_workers <= data.partitions / {cfg.cluster.max_workers}")
    return out


def check_sizes(cfg: Config, partitions: int | None = None) -> list[int]:
    """Refuse an elastic range with a size that cannot keep the global batch, naming each and the
    sizes that work; returns the sizes."""
    ok, bad = elastic_sizes(cfg, partitions)
    if bad and cfg.cluster.min_workers == cfg.cluster.max_workers:  # one size (distrain plan --gpus N)
        n = cfg.cluster.min_workers
        raise TopologyError(
            f"{n} workers cannot keep the global batch: {bad[n]}; set train.global_batch_size to a multiple of "
            f"train.micro_batch_size x {n} (or data.partitions to a multiple of {n})"
        )
    if bad:
        w, shown = cfg.cluster.workers, list(bad.items())[:4]
        more = f" (and {len(bad) - 4} more sizes)" if len(bad) > 4 else ""
        works = ", ".join(map(str, ok[:8])) + (f", ... ({len(ok)} in all)" if len(ok) > 8 else "")
        raise TopologyError(
            f"cluster.workers={{min: {w.min}, max: {w.max}}}: Ray may run any size in the range, and "
            + "; ".join(f"{n} workers cannot keep the global batch ({why})" for n, why in shown)
            + f"{more}. Sizes that work: {works or 'none'}; narrow the range to them"
            + (
                f", or set {' and '.join(fixes)}"
                if (fixes := _fixes(cfg, bad))
                else " (no global batch near this one fits every size of a range this wide)"
            )
        )
    return ok


def check_topology(cfg: Config, world_size: int) -> None:
    """Refuse a mesh or batch layout that does not multiply out, printing every factor."""
    dp, sp, tp = mesh(cfg, world_size)
    want = cfg.train.global_batch_size
    have = global_batch(cfg, world_size)
    k = cfg.data.partitions
    ranks = f"the {dp} data-parallel ranks ({mesh_line(cfg, world_size)})" if dp != world_size else ""
    if k is not None and k % dp:
        raise TopologyError(
            f"data.partitions={k} is not divisible by "
            + (ranks or f"the world size {world_size}")
            + f": each data-parallel rank reads data.partitions / {dp} partitions; set data.partitions to a multiple of {dp}"
        )
    if want is not None and want != have:
        per = cfg.train.micro_batch_size * dp
        hint = (
            f"set parallel.grad_accum={want // per}"
            if want % per == 0
            else "pick train.global_batch_size divisible by micro_batch_size x data-parallel ranks"
        )
        size = (
            f"data-parallel size {dp} ({mesh_line(cfg, world_size)})"
            if dp != world_size
            else f"world size {world_size}"
        )
        raise TopologyError(
            f"train.global_batch_size={want} but train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"parallel.grad_accum={cfg.parallel.grad_accum} x {size} = {have}; {hint}, "
            "or drop train.global_batch_size"
        )
