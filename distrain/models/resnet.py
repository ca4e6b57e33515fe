"""torchvision ResNet classifier. State-dict keys stay torchvision's, so exports load back into
``torchvision.models.resnetNN``."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from distrain.config.schema import ModelSection
from distrain.models import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config


class ResNetModelConfig(ModelSection):
    batch_kind: ClassVar[Literal["tokens", "images"]] = "images"

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

    def check(self, cfg) -> None:
        for key in ("mean", "std"):
            values = getattr(cfg.data, key)
            if values is not None and len(values) != self.in_channels:
                raise ValueError(
                    f"data.{key} has {len(values)} values but model.in_channels={self.in_channels}; give one per channel"
                )


def build(cfg: Config) -> nn.Module:
    import torchvision
    from torch import nn

    m = cfg.model
    model = getattr(torchvision.models, f"resnet{m.depth}")(weights=None, num_classes=m.num_classes)
    if m.in_channels != 3:
        model.conv1 = nn.Conv2d(m.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if m.dropout > 0:
        # dropout before the head without renaming fc.* (the avgpool has no parameters)
        model.avgpool = nn.Sequential(model.avgpool, nn.Dropout(m.dropout))
    return model


def loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    import torch.nn.functional as F

    logits = model(batch["images"])
    return F.cross_entropy(logits.float(), batch["labels"])


@lru_cache(maxsize=16)
def _flops(depth: int, num_classes: int, image_size: int, in_channels: int) -> float:
    import torch
    import torchvision
    from torch import nn

    from distrain.models.flops import measured_train_flops

    def make() -> nn.Module:
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model

    def step(model: nn.Module) -> None:
        # two images: BatchNorm in training mode needs more than one value per channel
        x = torch.randn(2, in_channels, image_size, image_size, device="meta")
        model(x).sum().backward()

    return measured_train_flops(make, step) / 2


def flops_per_sample(cfg: Config) -> float:
    """Forward + backward FLOPs per image, measured once with FlopCounterMode."""
    m = cfg.model
    return _flops(m.depth, m.num_classes, m.image_size, m.in_channels)


SPEC = ModelSpec(
    name="resnet", config=ResNetModelConfig, build=build, loss=loss, flops_per_sample=flops_per_sample
)
