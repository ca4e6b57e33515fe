"""FLOPs measured by ``torch.utils.flop_counter.FlopCounterMode`` (one forward + backward)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def measured_train_flops(
    make: Callable[[], nn.Module], step: Callable[[nn.Module], None], device: str = "meta"
) -> float:
    """Build a model with ``make`` (on ``device``; 'meta' allocates nothing), run ``step`` under
    FlopCounterMode and return the FLOPs counted (forward + backward)."""
    with torch.device(device):
        model = make()
    with FlopCounterMode(display=False) as counter:
        step(model)
    return float(counter.get_total_flops())
