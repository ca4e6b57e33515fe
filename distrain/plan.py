"""``distrain plan``: what a config needs and costs on a given cluster, with no GPU and in seconds.

Per GPU (rank), for ``N`` data-parallel ranks and a model of ``P`` parameters (counted on the meta
device: nothing is allocated), in bytes:

- **Model states**, DeepSpeed's layout as its engine holds it after a step (checked against the
  tensors a real engine holds, ZeRO 0-3, in ``tests/test_plan.py``). ``w`` = 2 bytes for weights
  cast to bf16/fp16 (``parallel.mixed_precision`` params), else 4; Adam keeps two fp32 moments
  (8 bytes); ZeRO keeps an fp32 master copy of its partition (4 bytes; ZeRO 0 only in bf16/fp16).
  Stage 0: weights ``wP``, master ``4P`` (mixed precision only), optimizer ``8P``; stage 1 and 2:
  master and optimizer divided by ``N``; stage 3: weights, master, optimizer and the gradient
  partition (``wP/N``) divided by ``N``, plus full copies of the parameters below DeepSpeed's
  persistence threshold (1e5 elements). ZeRO-Offload moves master and optimizer (and with
  ``offload_params`` the weights) to CPU memory.
- **Gradients** while backward runs: ``wP`` (stage 0 and 1), DeepSpeed's reduce bucket (stage 2),
  the partition above (stage 3).
- **DeepSpeed's working buffers** at its defaults (distrain sets none): the reduce bucket of 5e8
  elements in ``w`` bytes at stage 2 and 3, and at stage 3 the parameters gathered for the layer
  being computed plus the prefetch bucket (5e7 elements).
- **Activations** of one micro-batch. Transformers: Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", arXiv:2205.05198, section 4) count the tensors each op
  of a block saves for backward, per token, as a sum of terms in the hidden size; the same count
  for the blocks distrain builds (transformers' GPT-2 and Llama with SDPA attention, no dropout)
  gives, in elements per token: GPT-2 ``L(8h + 5f + a) + 2h + V``, Llama ``L(10h + 4f) + 3h + V``
  (``h`` hidden, ``f`` MLP width, ``a`` heads, ``V`` vocabulary: the logits, kept in fp32 for the
  loss as well). With activation checkpointing each block keeps only its input (``h``) and one
  block is recomputed at a time. Other models (CNNs, the LSTM): the bytes of the tensors a forward
  saves, traced under fake tensors.

Per step: samples, tokens and FLOPs (the model's ``flops_per_sample``), the time at a stated MFU
against the card's dense peak, the time to ``train.steps``, energy (card power x time x
``metrics.pue``), CO2e (``metrics.grid_g_per_kwh``) and the checkpoint's size (weights, Adam's
moments and the master copy: 16 bytes a parameter in fp32 at ZeRO 1-3, 12 at ZeRO 0, 14 in bf16).
"""

from __future__ import annotations

from typing import Any

from distrain.config import Config, dp_size, global_batch, mesh_line, sized_for
from distrain.errors import ConfigError

GiB = 2**30
PERSISTENCE_THRESHOLD = 100_000  # ZeRO 3: parameters smaller than this stay whole on every rank
REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default (elements)
PREFETCH_BUCKET = 50_000_000  # ZeRO 3 stage3_prefetch_bucket_size default (elements)
DEFAULT_MFU = 0.40  # assumed where no GPU run of distrain has been measured (benchmarks/RESULTS.md)

# elements saved per token by one block (coefficients of h, f, heads) and by the rest (of h)
_BLOCK = {"gpt2": (8, 5, 1, 2), "llama": (10, 4, 0, 3)}
# of a block's elements per token, those (in h) outside AutoTP's split layers: the two norms'
# inputs and outputs (the split layers' inputs are whole on every rank)
_WHOLE = {"llama": 4}


def _part_params(cfg: Config) -> dict[str, tuple[int, int, int]]:
    """Each part's (parameters, those below ZeRO 3's persistence threshold, the largest block's),
    counted on the meta device."""
    import torch

    from distrain.models import get_spec

    spec = get_spec(cfg.model.name)
    with torch.device("meta"):
        built = spec.build(cfg)
    parts = built if isinstance(built, dict) else {spec.parts[0]: built}
    out = {}
    for name, model in parts.items():
        sizes = [p.numel() for p in model.parameters()]
        blocks = [sum(p.numel() for p in m.parameters()) for m in _blocks(model)] or [max(sizes)]
        out[name] = (sum(sizes), sum(n for n in sizes if n < PERSISTENCE_THRESHOLD), max(blocks))
    return out


def _params(cfg: Config) -> tuple[int, int, int]:
    """(parameters, those below ZeRO 3's persistence threshold, the largest block's) of the whole
    model: every part's summed, the largest block of any."""
    counts = list(_part_params(cfg).values())
    return sum(c[0] for c in counts), sum(c[1] for c in counts), max(c[2] for c in counts)


def _blocks(model) -> list:
    """The repeated blocks of a model (transformer layers, ResNet stages), else none."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            return list(m)
    return []


def weight_bytes(cfg: Config) -> int:
    from distrain.parallel.engine import mixed_precision_mode

    return 2 if mixed_precision_mode(cfg) == "params" else 4


def model_states(cfg: Config, world: int, params: int, small: int) -> dict[str, float]:
    """Bytes per rank of weights, master copy and optimizer states after a step, and of the
    gradients kept between steps; on the GPU and (offload) in CPU memory."""
    p, z, w = cfg.parallel, cfg.parallel.zero_stage, weight_bytes(cfg)
    mixed = w == 2
    if z == 0:
        weights, master, optim, grads = w * params, (4 * params if mixed else 0), 8 * params, 0
    elif z < 3:
        weights, master, optim, grads = w * params, 4 * params / world, 8 * params / world, 0
    else:
        part = params / world
        weights, master, optim, grads = w * (part + small), 4 * part, 8 * part, w * part
    out = {"weights": weights, "master": master, "optimizer": optim, "gradients": grads, "cpu": 0.0}
    if p.offload_optimizer:
        out["cpu"] += out["master"] + out["optimizer"]
        out["master"] = out["optimizer"] = 0.0
    if p.offload_params:
        out["cpu"] += w * params / world
        out["weights"] = w * small
    return out


def working(cfg: Config, world: int, params: int, block: int) -> dict[str, float]:
    """Gradients while backward runs and DeepSpeed's buffers, bytes per rank."""
    z, w = cfg.parallel.zero_stage, weight_bytes(cfg)
    grads = w * params if z < 2 else 0.0
    bucket = w * REDUCE_BUCKET if z >= 2 else 0.0
    gathered = w * min(params, block + PREFETCH_BUCKET) if z == 3 else 0.0
    return {"gradients_in_backward": grads, "reduce_bucket": bucket, "gathered_params": gathered}


def activation_bytes(cfg: Config, micro: int | None = None) -> tuple[float, str]:
    """Bytes of the activations one micro-batch keeps for backward on one rank, and how they were
    found. Sequence parallelism divides every term by sp (a rank keeps seq_len / sp tokens; inside
    attention, n_head / sp heads over the whole sequence: as many elements). Tensor parallelism
    divides what the split layers keep (``block_elements``) and the vocabulary-split logits by tp."""
    m, micro = cfg.model, micro or cfg.train.micro_batch_size
    act = activation_width(cfg)
    sp, tp = cfg.parallel.sequence_parallel, cfg.parallel.tensor_parallel
    if m.name == "gpt" and m.arch in _BLOCK:
        block, rest = block_elements(cfg)
        L, V = m.n_layer, m.vocab_size
        if tp > 1:
            whole = _WHOLE[m.arch] * m.d_model  # the norms' inputs and outputs, the residuals
            block = whole + (block - whole) / tp
            V = V / tp if m.tie_embeddings else V  # a tied head is split by vocabulary rows
        blocks = L * m.d_model + block if cfg.parallel.activation_checkpointing else L * block
        logits = V * (act + 4 if act != 4 else 4)  # and their fp32 copy for the loss
        tokens = micro * cfg.data.seq_len / sp
        how = "Korthikanti et al. 2022 (per-op count)" + (f", / sp {sp}" if sp > 1 else "")
        return tokens * ((blocks + rest) * act + logits), how + (
            f", split layers / tp {tp}" if tp > 1 else ""
        )
    return _traced(cfg, micro), "saved tensors of a forward under fake tensors"


def all_to_all_bytes(cfg: Config, micro: int | None = None) -> float:
    """DeepSpeed Ulysses' buffers while one layer's attention runs: q, k and v made contiguous for
    the all-to-all and its output, then the attention output and its reverse all-to-all's."""
    sp = cfg.parallel.sequence_parallel
    if sp == 1:
        return 0.0
    m, micro = cfg.model, micro or cfg.train.micro_batch_size
    qkv = m.d_model + 2 * m.d_model * m.n_kv_head // m.n_head
    if m.n_kv_head < sp:  # replicated to one key/value head a rank
        qkv = m.d_model + 2 * sp * m.d_model // m.n_head
    return micro * cfg.data.seq_len / sp * (2 * qkv + 2 * m.d_model) * activation_width(cfg)


def activation_width(cfg: Config) -> int:
    """Bytes of an activation element: 2 in bf16/fp16, else 4."""
    return 2 if cfg.parallel.precision != "fp32" else 4


def block_elements(cfg: Config) -> tuple[int, int]:
    """Activation elements per token that one transformer block saves, and the rest of the model
    besides the logits (embeddings, the final norm)."""
    m = cfg.model
    ch, cf, ca, cr = _BLOCK[m.arch]
    return ch * m.d_model + cf * m.d_ff + ca * m.n_head, cr * m.d_model


def _traced(cfg: Config, micro: int) -> float:
    """Bytes of the tensors a forward and loss save for backward (fake tensors: nothing is run);
    for a model of several updates, the largest update's (each one's backward frees them)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from distrain.models import get_spec

    spec = get_spec(cfg.model.name)
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision)
    most = 0.0
    with FakeTensorMode(allow_non_fake_inputs=True):
        built = spec.build(cfg)
        parts = built if isinstance(built, dict) else {spec.parts[0]: built}
        if cast is not None and weight_bytes(cfg) == 2:
            parts = {k: m.to(cast) for k, m in parts.items()}
        params = {p.untyped_storage()._cdata for m in parts.values() for p in m.parameters()}
        state = spec.state(cfg) if spec.state is not None else None
        for update in spec.steps(cfg):
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                st = t.untyped_storage()
                seen.setdefault(st._cdata, st.nbytes())  # one storage once (views share it)
                return t

            for name, m in parts.items():
                m.requires_grad_(name == update.part)
            batch = _fake_batch(cfg, micro)
            if cast is not None and "images" in batch and weight_bytes(cfg) == 2:
                batch["images"] = batch["images"].to(cast)
            autocast = torch.autocast("cpu", dtype=cast, enabled=cast is not None and weight_bytes(cfg) == 4)
            with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                update.loss(parts, batch, state)
            most = max(most, float(sum(v for k, v in seen.items() if k not in params)))
    return most


def _fake_batch(cfg: Config, micro: int) -> dict[str, Any]:
    import torch

    m = cfg.model
    if m.batch_kind == "images":
        return {
            "images": torch.zeros(micro, m.in_channels, m.image_size, m.image_size),
            "labels": torch.zeros(micro, dtype=torch.long),
        }
    return {"input_ids": torch.zeros(micro, cfg.data.seq_len, dtype=torch.long)}


def _card(gpu: str | None):
    """The peak table's entry for ``--gpu`` (default H100)."""
    from distrain.metrics.peak import GPU_PEAKS, find_gpu

    card = find_gpu(gpu or "H100")
    if card is None:
        raise ConfigError(
            f"--gpu {gpu}: not in the peak table; use one of {', '.join(e.name for e in GPU_PEAKS)}"
        )
    return card


def _sized(cfg: Config, world: int) -> Config:
    """``cfg`` at ``world`` GPUs: its ``train.global_batch_size`` kept by a whole grad_accum."""
    cfg = sized_for(cfg, world)
    want = cfg.train.global_batch_size
    if want is None or want == global_batch(cfg, world):
        return cfg
    per = cfg.train.micro_batch_size * dp_size(cfg, world)
    if want % per:
        raise ConfigError(
            f"train.global_batch_size={want} is not micro batch {cfg.train.micro_batch_size} x a whole "
            f"grad_accum x {dp_size(cfg, world)} data-parallel ranks ({mesh_line(cfg, world)}); pick --gpus "
            f"so that the data-parallel ranks divide {want // cfg.train.micro_batch_size}"
        )
    return cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"grad_accum": want // per})})


def _step(cfg: Config, world: int, card, mfu: float | None) -> dict:
    """One step's samples, tokens and FLOPs, and its time at the card's peak and the MFU."""
    from distrain.models import get_spec

    batch = global_batch(cfg, world)
    flops = sum(get_spec(cfg.model.name).flops_by_part(cfg).values()) * batch
    dtype = (
        cfg.parallel.precision
        if cfg.parallel.precision != "fp32"
        else ("tf32" if cfg.parallel.tf32 else "fp32")
    )
    peak = card.tflops.get(dtype, 0.0) * 1e12
    mfu_used = mfu if mfu is not None else DEFAULT_MFU
    return {
        "samples": batch,
        "tokens": batch * cfg.data.seq_len if cfg.model.batch_kind == "tokens" else None,
        "flops": flops,
        "mfu": mfu_used,
        "mfu_from": "--mfu" if mfu is not None else "assumed (no GPU run measured in benchmarks/RESULTS.md)",
        "peak_tflops": peak / 1e12 if peak else None,
        "seconds": flops / (world * peak * mfu_used) if peak else None,
    }


def plan(cfg: Config, gpus: int | None = None, gpu: str | None = None, mfu: float | None = None) -> dict:
    """The plan of ``cfg`` on ``gpus`` GPUs (default: the config's workers) of card ``gpu`` (a name
    of the peak table; default H100)."""
    from distrain.metrics.energy import co2e_kg

    card = _card(gpu)
    world = gpus or cfg.cluster.max_workers
    if world < 1:
        raise ConfigError(f"--gpus {world}: at least 1")
    cfg = _sized(cfg, world)
    counts = _part_params(cfg)
    params = sum(c[0] for c in counts.values())
    gpu_terms, cpu, acts_how = _per_gpu(cfg, world, counts)
    total = sum(gpu_terms.values())
    memory = card.memory_gb * 1e9
    step = _step(cfg, world, card, mfu)
    run_s = step["seconds"] * cfg.train.steps if step["seconds"] else None
    joules = card.power_w * world * run_s if run_s else None
    mc = cfg.metrics
    w = weight_bytes(cfg)
    out = {
        "gpu": card.name,
        "gpu_memory_gb": card.memory_gb,
        "gpus": world,
        "params": params,
        **({"part_params": {k: c[0] for k, c in counts.items()}} if len(counts) > 1 else {}),
        "zero_stage": cfg.parallel.zero_stage,
        "mesh": mesh_line(cfg, world),
        "precision": cfg.parallel.precision,
        "micro_batch": cfg.train.micro_batch_size,
        "grad_accum": cfg.parallel.grad_accum,
        "per_gpu_bytes": gpu_terms,
        "cpu_bytes_per_gpu": cpu,
        "activations_from": acts_how,
        "total_bytes": total,
        "fits": total <= memory,
        "limiting": max(gpu_terms, key=gpu_terms.get),
        "step": step,
        "steps": cfg.train.steps,
        "run_seconds": run_s,
        "energy_kwh": joules / 3.6e6 * mc.pue if joules else None,
        "co2e_kg": co2e_kg(joules, mc.grid_g_per_kwh, mc.pue) if joules else None,
        # DeepSpeed's files: the weights, Adam's moments, and the fp32 master copy where one is kept
        "checkpoint_bytes": (w + 8 + (4 if cfg.parallel.zero_stage or w == 2 else 0)) * params,
    }
    if not out["fits"]:
        out["fix"] = _fix(cfg, world, counts, memory)
    if cfg.model.name == "gpt" and world > 1:
        out["meshes"] = _meshes(cfg, world, counts)
    return out


def _with(cfg: Config, section: str, **keys) -> Config:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=keys)})


def _split(cfg: Config, world: int, sp: int, tp: int) -> Config | None:
    """``cfg`` split sp x tp over ``world`` ranks, or None where the model or ZeRO stage refuses it."""
    if world % (sp * tp):
        return None
    trial = _with(cfg, "parallel", sequence_parallel=sp, tensor_parallel=tp)
    if tp > 1 and trial.parallel.zero_stage in (0, 3):
        trial = _with(trial, "parallel", zero_stage=1 if trial.parallel.zero_stage == 0 else 2)
    try:
        trial.model.check(trial)
    except ValueError:
        return None
    return trial


def _meshes(cfg: Config, world: int, counts: dict[str, tuple[int, int, int]]) -> list[dict[str, Any]]:
    """Bytes per GPU of each way to split ``world`` ranks: sp or tp in powers of two (one of them)."""
    out = []
    n = 1
    while n <= world:
        for sp, tp in ((n, 1), (1, n)) if n > 1 else ((1, 1),):
            trial = _split(cfg, world, sp, tp)
            if trial is not None:
                total = sum(_per_gpu(trial, world, counts)[0].values())
                out.append(
                    {
                        "dp": world // (sp * tp),
                        "sp": sp,
                        "tp": tp,
                        "zero_stage": trial.parallel.zero_stage,
                        "total_bytes": total,
                    }
                )
        n *= 2
    return out


def _fix(cfg: Config, world: int, counts: dict[str, tuple[int, int, int]], memory: float) -> str | None:
    """The first change that makes the plan fit: a higher ZeRO stage, activation checkpointing, a
    smaller micro batch, offload."""
    p = cfg.parallel
    tries: list[tuple[str, dict[str, Any]]] = []
    for z in range(p.zero_stage + 1, 4):
        tries.append((f"parallel.zero_stage={z}", {"parallel": {"zero_stage": z}}))
    if cfg.model.activation_checkpointing and not p.activation_checkpointing:
        tries.append(
            ("parallel.activation_checkpointing=true", {"parallel": {"activation_checkpointing": True}})
        )
    sp = 2
    while sp <= world and p.tensor_parallel == 1:
        if _split(cfg, world, sp, 1) is not None:
            tries.append((f"parallel.sequence_parallel={sp}", {"parallel": {"sequence_parallel": sp}}))
        sp *= 2
    micro = cfg.train.micro_batch_size
    while micro > 1:
        micro //= 2
        tries.append((f"train.micro_batch_size={micro}", {"train": {"micro_batch_size": micro}}))
    if p.zero_stage >= 1 and not p.offload_optimizer:
        tries.append(("parallel.offload_optimizer=true", {"parallel": {"offload_optimizer": True}}))
    for what, change in tries:
        trial = cfg
        for section, keys in change.items():
            sec = getattr(trial, section).model_copy(update=keys)
            trial = trial.model_copy(update={section: sec})
        if sum(_per_gpu(trial, world, counts)[0].values()) <= memory:  # the same parameters
            return what
    return None


def _per_gpu(
    cfg: Config, world: int, counts: dict[str, tuple[int, int, int]]
) -> tuple[dict[str, float], float, str]:
    """(bytes per GPU by term, bytes offloaded to CPU memory, how the activations were found) for
    each part's parameter ``counts`` from ``_part_params``. Every part's engine holds its model
    states and its reduce bucket for the whole run; gradients and gathered parameters live while
    one part's update runs, so the largest part's count."""
    terms: dict[str, float] = {}
    cpu = 0.0
    tp = cfg.parallel.tensor_parallel
    zero_world = world // tp  # ZeRO partitions over the data-parallel ranks of one TP rank
    for part, (params, small, block) in counts.items():
        if tp > 1:  # AutoTP splits the matmul weights (and a tied embedding); the norms stay whole
            from distrain.models.gpt import matmul_params

            split = matmul_params(cfg)
            params, small = split // tp + (params - split), small
        states = model_states(cfg.for_part(part), zero_world, params, small)
        cpu += states.pop("cpu")
        for k, v in states.items():
            terms[k] = terms.get(k, 0.0) + v
        for k, v in working(cfg, zero_world, params, block).items():
            terms[k] = terms.get(k, 0.0) + v if k == "reduce_bucket" else max(terms.get(k, 0.0), v)
    acts, how = activation_bytes(cfg)
    terms["activations"] = acts
    terms["all_to_all"] = all_to_all_bytes(cfg)
    return terms, cpu, how


def _gib(b: float) -> str:
    return f"{b / GiB:,.2f} GiB" if b >= GiB else f"{b / 2**20:,.1f} MiB"


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.2f} s"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_plan(p: dict) -> str:
    """The plan as the console shows it."""
    lines = [
        f"plan: {p['params'] / 1e6:,.1f}M parameters on {p['gpus']} x {p['gpu']} ({p['gpu_memory_gb']:.0f} GB), "
        f"ZeRO {p['zero_stage']}, {p['precision']}, micro batch {p['micro_batch']} x grad_accum {p['grad_accum']}, "
        f"{p['mesh']}",
        "per GPU:",
    ]
    if p.get("part_params"):
        each = ", ".join(f"{k} {v / 1e6:,.2f}M" for k, v in p["part_params"].items())
        lines.insert(1, f"parts: {each} parameters, one engine (weights, optimizer, buckets) each")
    for k, v in p["per_gpu_bytes"].items():
        if v:
            lines.append(f"  {k:<22} {_gib(v):>14}")
    if p["cpu_bytes_per_gpu"]:
        lines.append(f"  {'(offloaded to CPU)':<22} {_gib(p['cpu_bytes_per_gpu']):>14}")
    verdict = (
        "fits"
        if p["fits"]
        else f"does not fit: {p['limiting']} is the largest term; "
        + (f"try {p['fix']}" if p.get("fix") else "no single change fits")
    )
    lines.append(
        f"  {'total':<22} {_gib(p['total_bytes']):>14} ({p['total_bytes'] / 1e9:,.1f} GB of "
        f"{p['gpu_memory_gb']:.0f} GB): {verdict}"
    )
    lines.append(f"  activations: {p['activations_from']}")
    if p.get("meshes"):
        memory = p["gpu_memory_gb"] * 1e9
        lines.append(
            "meshes: "
            + "; ".join(
                f"dp {m['dp']} x sp {m['sp']} x tp {m['tp']} (ZeRO {m['zero_stage']}) {_gib(m['total_bytes'])} "
                + ("fits" if m["total_bytes"] <= memory else "does not fit")
                for m in p["meshes"]
            )
        )
    s = p["step"]
    tokens = f", {s['tokens']:,} tokens" if s["tokens"] else ""
    lines.append(
        f"per step: {s['samples']:,} samples{tokens}, {s['flops']:.3g} FLOPs, {_dur(s['seconds'])} at "
        f"{s['mfu']:.0%} MFU ({s['mfu_from']})"
    )
    energy = f"{p['energy_kwh']:,.1f} kWh, {p['co2e_kg']:,.1f} kg CO2e" if p["energy_kwh"] else "n/a"
    lines.append(f"{p['steps']:,} steps: {_dur(p['run_seconds'])}; energy {energy}")
    lines.append(f"checkpoint: {_gib(p['checkpoint_bytes'])}")
    if p.get("data_layout"):
        lines.append(p["data_layout"])
    return "\n".join(lines)
