"""Decoder-only causal LM (GPT-2 or Llama architecture) built by transformers from a config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from distrain.config.schema import ModelSection
from distrain.models import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config

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


class GPTModelConfig(ModelSection):
    activation_checkpointing: ClassVar[bool] = True
    splits: ClassVar[str | None] = None

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

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        """The preset's dimensions for those not set (before validation, so the model is built whole)."""
        if not isinstance(data, dict) or data.get("preset", "tiny") not in _GPT_PRESETS:
            return data  # an instance, or an unknown preset (its field reports it)
        preset = data.get("preset", "tiny")
        p, data = _GPT_PRESETS[preset], dict(data)
        for key in ("n_layer", "n_head", "d_model", "d_ff"):
            if data.get(key) is None:
                data[key] = p[key]
        if data.get("n_kv_head") is None:
            if data.get("arch", "gpt2") == "gpt2" and p["n_kv_head"]:
                raise ValueError(
                    f"model.preset={preset} is a Llama shape (grouped-query attention, {p['n_kv_head']} key/value "
                    f"heads of {p['n_head']}) but model.arch=gpt2 has none; set model.arch=llama, or pick a gpt2 "
                    f"preset ({', '.join(k for k, v in _GPT_PRESETS.items() if not v['n_kv_head'])})"
                )
            n_head = data["n_head"]
            if p["n_kv_head"] or (isinstance(n_head, int) and n_head >= 1):  # else n_head's field reports it
                data["n_kv_head"] = p["n_kv_head"] or n_head
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> GPTModelConfig:
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

    def check(self, cfg) -> None:
        max_len = self.max_seq_len or cfg.data.seq_len
        if cfg.data.seq_len > max_len:
            raise ValueError(
                f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({max_len}); raise model.max_seq_len or lower data.seq_len"
            )
        self._check_sequence_parallel(cfg)
        self._check_tensor_parallel(cfg)

    def _check_sequence_parallel(self, cfg) -> None:
        """Ulysses trades the sequence for attention heads: every rank of the group attends over the
        whole sequence with n_head / sp of the heads, on seq_len / sp tokens of it elsewhere."""
        sp, T = cfg.parallel.sequence_parallel, cfg.data.seq_len
        if sp == 1:
            return
        key = f"parallel.sequence_parallel={sp}"
        if self.arch != "llama":
            raise ValueError(
                f"{key}: model.arch={self.arch} cannot be split by DeepSpeed's Ulysses attention (it hands back "
                "the Llama-family attention layout, which GPT-2's attention does not take); set model.arch=llama, "
                "or use ZeRO 3 and parallel.activation_checkpointing for long GPT-2 sequences"
            )
        if self.n_head % sp:
            raise ValueError(
                f"{key}: model.n_head={self.n_head} is not divisible by it (each rank attends with n_head / sp heads); "
                f"pick a divisor of {self.n_head}"
            )
        kv = self.n_kv_head
        if kv % sp and sp % kv:
            raise ValueError(
                f"{key}: model.n_kv_head={kv} neither divides it nor is divisible by it (key/value heads are split, "
                "or replicated, over the group); pick sp dividing n_kv_head, or a multiple of it"
            )
        if T % sp:
            raise ValueError(
                f"{key}: data.seq_len={T} is not divisible by it (each rank holds seq_len / sp tokens); "
                f"set data.seq_len to a multiple of {sp}"
            )

    def _check_tensor_parallel(self, cfg) -> None:
        """AutoTP splits q/k/v/gate/up by columns and o/down by rows, following the key/value heads."""
        p = cfg.parallel
        tp = p.tensor_parallel
        if tp == 1:
            return
        key = f"parallel.tensor_parallel={tp}"
        if self.arch != "llama":
            raise ValueError(
                f"{key}: model.arch={self.arch} cannot be split by DeepSpeed's AutoTP training (GPT-2's fused "
                "Conv1D attention has no tensor-parallel plan); set model.arch=llama, or shard "
                "GPT-2 with parallel.zero_stage=3"
            )
        for name, n in (("n_head", self.n_head), ("n_kv_head", self.n_kv_head), ("d_ff", self.d_ff)):
            if n % tp:
                raise ValueError(
                    f"{key}: model.{name}={n} is not divisible by it (each rank holds {name} / tp of every layer); "
                    f"pick a tensor_parallel that divides {n}"
                )
        if self.tie_embeddings and self.vocab_size % tp:
            raise ValueError(
                f"{key}: model.vocab_size={self.vocab_size} is not divisible by it (the tied embedding and LM head are "
                f"split by vocabulary rows); set model.vocab_size to a multiple of {tp}"
            )
        if p.zero_stage == 0:
            raise ValueError(
                f"{key} needs parallel.zero_stage 1 or 2: a tensor-parallel checkpoint is merged (for export and for "
                "a resume at another tensor_parallel) through DeepSpeed's universal format, which reads the ZeRO "
                "optimizer files that ZeRO 0 does not write; set parallel.zero_stage=1"
            )


def hf_config(cfg: Config):
    """The transformers config for ``cfg.model`` (random init; nothing is downloaded)."""
    m = cfg.model
    max_len = m.max_seq_len or cfg.data.seq_len
    if m.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=max_len,
            n_embd=m.d_model,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_inner=m.d_ff,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            tie_word_embeddings=m.tie_embeddings,
            bos_token_id=m.vocab_size - 1,
            eos_token_id=m.vocab_size - 1,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_kv_head,
        max_position_embeddings=max_len,
        attention_dropout=m.dropout,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=m.vocab_size - 1,
        eos_token_id=m.vocab_size - 1,
    )


def build(cfg: Config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="sdpa")
    model.loss_type = "ForCausalLM"  # mean next-token cross-entropy (transformers' default, named)
    if cfg.parallel.activation_checkpointing:  # recompute each block's activations in backward
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def matmul_params(cfg: Config) -> int:
    """Parameters that take part in a matmul per token: every block's weights plus the LM head."""
    m = cfg.model
    d, f, L, V = m.d_model, m.d_ff, m.n_layer, m.vocab_size
    if m.arch == "gpt2":
        per_layer = 4 * d * d + 2 * d * f  # qkv + proj, fc + proj
    else:
        kv = d * m.n_kv_head // m.n_head
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o, k, v; gate, up, down
    return L * per_layer + V * d


def flops_per_sample(cfg: Config) -> float:
    """Training FLOPs per sequence, PaLM appendix B (Chowdhery et al. 2022, arXiv:2204.02311):
    per token 6N + 12·L·H·Q·T, N = matmul parameters, H·Q = d_model, T = sequence length."""
    m = cfg.model
    T = cfg.data.seq_len
    per_token = 6 * matmul_params(cfg) + 12 * m.n_layer * m.d_model * T
    return float(per_token * T)


SPEC = ModelSpec(name="gpt", config=GPTModelConfig, build=build, loss=loss, flops_per_sample=flops_per_sample)
