"""FLOPs per sample from each ModelSpec: analytic for gpt, measured for resnet and lstm."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrain.config import load_config
from distrain.models import build_model, get_spec
from tests.conftest import CONFIGS


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.preset=mini"],
        ["model.preset=mini", "model.arch=llama", "model.n_kv_head=2", "model.tie_embeddings=false"],
        ["model.preset=small", "data.seq_len=256", "model.vocab_size=50304"],
    ],
)
def test_gpt_analytic_flops_match_flop_counter(overrides):
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", overrides)
    model = build_model(cfg)
    # FlopCounterMode has no formula for the CPU SDPA kernel: count attention as the eager matmuls
    model.set_attn_implementation("eager")
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len))
    with FlopCounterMode(display=False) as fc:
        get_spec("gpt").loss(model, {"input_ids": ids}).backward()
    measured = fc.get_total_flops()
    analytic = get_spec("gpt").flops_per_sample(cfg)
    assert analytic == pytest.approx(measured, rel=0.03)


def test_resnet50_forward_matches_published_gflops():
    cfg = load_config(
        CONFIGS / "resnet-cpu-tiny.yaml", ["model.depth=50", "model.num_classes=1000", "model.image_size=224"]
    )
    train_flops = get_spec("resnet").flops_per_sample(cfg)
    # torchvision's ResNet-50 card: 4.09 GMACs forward = 8.18 GFLOPs; backward costs twice the forward
    assert train_flops / 3 == pytest.approx(8.18e9, rel=0.02)


def test_lstm_flops_are_measured_and_scale_with_length():
    cfg = load_config(CONFIGS / "lstm-cpu-tiny.yaml")
    f128 = get_spec("lstm").flops_per_sample(cfg)
    f256 = get_spec("lstm").flops_per_sample(
        load_config(CONFIGS / "lstm-cpu-tiny.yaml", ["data.seq_len=256"])
    )
    m = cfg.model
    per_token_fwd = (
        2 * (4 * m.d_hidden * (m.d_embed + m.d_hidden) + 4 * m.d_hidden * 2 * m.d_hidden)
        + 2 * m.d_hidden * m.vocab_size
    )
    # forward + backward: the backward costs between one and two forwards (no gradient for the token ids)
    assert 2 * per_token_fwd * 127 <= f128 <= 3 * per_token_fwd * 127
    assert f256 / f128 == pytest.approx(255 / 127, rel=0.01)
