"""Decoder-only causal LM (GPT-2 or Llama architecture) built by transformers from a config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distrain.config import Config
from distrain.models import ModelSpec


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


SPEC = ModelSpec(name="gpt", batch_kind="tokens", build=build, loss=loss, flops_per_sample=flops_per_sample)
