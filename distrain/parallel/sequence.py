"""Ulysses sequence parallelism (DeepSpeed's ALST, ``deepspeed.runtime.sequence_parallel``) for the
transformers causal LMs: each rank of a group of ``parallel.sequence_parallel`` consecutive ranks
holds ``seq_len / sp`` tokens of every sequence outside attention, and inside attention trades
them by all-to-all for ``n_head / sp`` heads over the whole sequence.

Every rank of a group reads the same micro-batch (the data is keyed by the data-parallel rank) and
keeps its slice of it: the slicing of DeepSpeed's ``UlyssesSPDataLoaderAdapter`` (global position
ids, labels shifted before the split), without that adapter's gather of one batch from each rank,
which assumes every rank of the group read a different one.

The loss is the token-weighted mean over the group. The engine is built without DeepSpeed's
sequence-parallel ``mpu`` (``sequence_parallel_size`` in the ds_config alone sizes the batch): it
then reduces gradients averaging over all dp x sp ranks at every ZeRO stage, and its checkpoints
convert to the universal format. (With the ``mpu``, ZeRO 0-2 sum over the group while ZeRO 3's
reduce-scatter averages, and a ZeRO 1-2 checkpoint records sp as its tensor-parallel degree, which
the universal conversion refuses.) Each rank's loss carries sp times the gradient of its own
tokens' share of the mean, so the average is the whole sequence's gradient, and the value of the
whole mean, which the trainer logs and watches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distrain.config import Config
from distrain.parallel.collectives import device_sum

IGNORE = -100  # the label of the last position, which predicts nothing


class SequenceParallel:
    """The Ulysses attention registered for ``model``'s transformers attention, its group, the
    batch slicing and the loss."""

    def __init__(self, cfg: Config, model: nn.Module):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        self.size = cfg.parallel.sequence_parallel
        self.seq_len = cfg.data.seq_len
        # replaces the "sdpa" entry of transformers' attention functions in this process with one
        # that runs it between the all-to-alls (the model asks for "sdpa": ``gpt.build``)
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model,
            core_attn_implementation="sdpa",
            sequence_parallel_size=self.size,
            micro_batch_size=cfg.train.micro_batch_size,
            seq_length=self.seq_len,
            seq_length_is_variable=False,
        )
        self.group = mpu.get_sequence_parallel_group()
        self.rank = mpu.get_sequence_parallel_rank()
        self.grad_scale = float(self.size)

    def shard(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This rank's slice of a micro-batch: input ids, their global positions and the labels
        (the next token; ``IGNORE`` after the last), each ``seq_len / sp`` long."""
        ids = batch["input_ids"]
        b, t = ids.shape
        if t != self.seq_len:
            raise ValueError(
                f"sequence parallelism: a micro-batch of {t} tokens, data.seq_len is {self.seq_len}"
            )
        chunk = t // self.size
        cut = slice(chunk * self.rank, chunk * (self.rank + 1))
        positions = torch.arange(t, device=ids.device).expand(b, t)
        labels = F.pad(ids, (0, 1), value=IGNORE)[:, 1:]
        return {"input_ids": ids[:, cut], "position_ids": positions[:, cut], "shift_labels": labels[:, cut]}

    def loss(self, parts: dict[str, Any], batch: dict[str, Any], state: Any = None) -> torch.Tensor:
        """The mean next-token cross-entropy over the group's tokens (a collective of the group)."""
        local = self.shard(batch)
        out = parts["model"](
            input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False
        )
        logits = out.logits
        labels = local["shift_labels"]
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        counts = torch.stack([total.detach(), (labels != IGNORE).sum().to(total.dtype)])
        group_total, tokens = device_sum(counts, self.group).unbind()
        own = self.grad_scale * total
        return (own + (group_total - own.detach())) / tokens
