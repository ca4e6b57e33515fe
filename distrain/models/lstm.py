"""A recurrent language model: embedding, stacked nn.LSTM, linear head."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from distrain.config.schema import ModelSection
from distrain.models import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config


class LSTMModelConfig(ModelSection):
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


@lru_cache(maxsize=1)
def module_class() -> type:
    """The ``nn.Module`` class (defined on first use: importing this file does not import torch)."""
    from torch import nn

    class LSTMLM(nn.Module):
        def __init__(
            self, vocab_size: int, d_embed: int, d_hidden: int, n_layer: int, dropout: float, tie: bool
        ):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, d_embed)
            self.lstm = nn.LSTM(
                d_embed,
                d_hidden,
                num_layers=n_layer,
                batch_first=True,
                dropout=dropout if n_layer > 1 else 0.0,
            )
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(d_hidden, vocab_size, bias=False)
            if tie:
                self.head.weight = self.embed.weight

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            h, _ = self.lstm(self.drop(self.embed(input_ids)))
            return self.head(self.drop(h))

    return LSTMLM


def build(cfg: Config) -> nn.Module:
    m = cfg.model
    return module_class()(m.vocab_size, m.d_embed, m.d_hidden, m.n_layer, m.dropout, m.tie_embeddings)


def loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    import torch.nn.functional as F

    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


@lru_cache(maxsize=16)
def _flops(vocab: int, d_embed: int, d_hidden: int, n_layer: int, seq_len: int) -> float:
    import torch

    from distrain.models.flops import measured_train_flops

    def step(model: nn.Module) -> None:
        ids = torch.zeros(1, seq_len - 1, dtype=torch.long, device="meta")
        model(ids).sum().backward()

    # on the meta device nn.LSTM runs as addmm per time step, which FlopCounterMode counts (the CPU
    # kernel is one fused oneDNN op it has no formula for)
    return measured_train_flops(lambda: module_class()(vocab, d_embed, d_hidden, n_layer, 0.0, False), step)


def flops_per_sample(cfg: Config) -> float:
    """Forward + backward FLOPs per sequence, measured once with FlopCounterMode."""
    m = cfg.model
    return _flops(m.vocab_size, m.d_embed, m.d_hidden, m.n_layer, cfg.data.seq_len)


SPEC = ModelSpec(
    name="lstm", config=LSTMModelConfig, build=build, loss=loss, flops_per_sample=flops_per_sample
)
