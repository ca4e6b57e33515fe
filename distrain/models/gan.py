"""DCGAN (Radford et al. 2015, arXiv:1511.06434): a generator of transposed convolutions and a
discriminator of strided convolutions, BatchNorm between them, for square images of 32 or 64 pixels.

Two parts, two engines: a training step is a discriminator update (real images against samples of
the generator, which takes no gradient), then a generator update against the discriminator just
updated (which takes none). Losses: the non-saturating ``bce`` of the paper, or ``hinge`` (Lim & Ye
2017, arXiv:1705.02894; Miyato et al. 2018)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from distrain.config.schema import ModelSection
from distrain.models import Generative, ModelSpec, Update

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config


class GANModelConfig(ModelSection):
    batch_kind: ClassVar[Literal["tokens", "images"]] = "images"
    parts: ClassVar[tuple[str, ...]] = ("generator", "discriminator")

    name: Literal["gan"] = Field("gan", description="DCGAN: a generator and a discriminator, two engines.")
    image_size: Literal[32, 64] = Field(32, description="Square image size the GAN generates (32 or 64).")
    in_channels: Literal[1, 3] = Field(
        3, description="Image channels, as the data gives them (greyscale images are read as 1)."
    )
    num_classes: int = Field(
        10, ge=1, description="Classes of the data's labels (read and checked; the GAN is unconditional)."
    )
    latent_dim: int = Field(100, ge=1, description="Size of the generator's Gaussian latent.")
    width: int = Field(
        64, ge=4, description="Feature maps of the generator's last and the discriminator's first layer."
    )
    loss: Literal["bce", "hinge"] = Field(
        "bce",
        description="bce: non-saturating cross-entropy (DCGAN); hinge: hinge loss for the discriminator.",
    )


def _ups(image_size: int) -> int:
    """Stride-2 layers between the 4x4 map and the last layer."""
    return int(math.log2(image_size)) - 3


def _init(module: nn.Module) -> nn.Module:
    """DCGAN's initialisation: convolutions N(0, 0.02), BatchNorm weights N(1, 0.02)."""
    from torch import nn

    for mod in module.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(mod.weight, 0.0, 0.02)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.normal_(mod.weight, 1.0, 0.02)
            nn.init.zeros_(mod.bias)
    return module


def generator(m: GANModelConfig) -> nn.Module:
    """Latents (n, latent_dim) -> images (n, C, S, S) in [-1, 1]."""
    from torch import nn

    n = _ups(m.image_size)
    c = m.width * 2**n
    layers: list[nn.Module] = [
        nn.Unflatten(1, (m.latent_dim, 1, 1)),
        nn.ConvTranspose2d(m.latent_dim, c, 4, 1, 0, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(True),
    ]
    for _ in range(n):
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
        c //= 2
    layers += [nn.ConvTranspose2d(c, m.in_channels, 4, 2, 1, bias=False), nn.Tanh()]
    return _init(nn.Sequential(*layers))


def discriminator(m: GANModelConfig) -> nn.Module:
    """Images (n, C, S, S) -> one logit each (n,)."""
    from torch import nn

    c = m.width
    layers: list[nn.Module] = [nn.Conv2d(m.in_channels, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for _ in range(_ups(m.image_size)):
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True)]
        c *= 2
    layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False), nn.Flatten(0)]
    return _init(nn.Sequential(*layers))


def build(cfg: Config) -> dict[str, nn.Module]:
    return {"generator": generator(cfg.model), "discriminator": discriminator(cfg.model)}


def _latents(like: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Training latents, drawn from this rank's torch stream (checkpointed with the rank)."""
    import torch

    return torch.randn(n, dim, device=like.device, dtype=like.dtype)


def _d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # -log D(x) - log(1 - D(G(z)))


def _g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    fake = fake.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()  # non-saturating: -log D(G(z))


def updates(cfg: Config) -> tuple[Update, ...]:
    """The discriminator's update (real images against the generator's samples, which take no
    gradient), then the generator's against the discriminator just updated."""
    import torch

    kind, dim = cfg.model.loss, cfg.model.latent_dim

    def d_update(parts, batch: dict[str, Any], state) -> torch.Tensor:
        real = batch["images"]
        with torch.no_grad():
            fake = parts["generator"](_latents(real, real.shape[0], dim))
        d = parts["discriminator"]
        return _d_loss(kind, d(real), d(fake))

    def g_update(parts, batch: dict[str, Any], state) -> torch.Tensor:
        real = batch["images"]
        return _g_loss(kind, parts["discriminator"](parts["generator"](_latents(real, real.shape[0], dim))))

    return Update("discriminator", d_update), Update("generator", g_update)


def evaluate(cfg: Config):
    kind, dim = cfg.model.loss, cfg.model.latent_dim

    def figures(parts, batch: dict[str, Any], state) -> dict[str, torch.Tensor]:
        real = batch["images"]
        d = parts["discriminator"]
        d_fake = d(parts["generator"](_latents(real, real.shape[0], dim)))
        return {"loss_discriminator": _d_loss(kind, d(real), d_fake), "loss_generator": _g_loss(kind, d_fake)}

    return figures


def latent(cfg: Config, n: int, gen: torch.Generator) -> torch.Tensor:
    import torch

    return torch.randn(n, cfg.model.latent_dim, generator=gen)


def decode(parts, z: torch.Tensor) -> torch.Tensor:
    g = parts["generator"]
    return g(z.to(next(g.parameters()).dtype))


# ------------------------------------------------------------------------------------------ FLOPs
def layer_flops(module: nn.Module, in_shape: tuple[int, ...]) -> list[float]:
    """Forward FLOPs of each convolution of ``module`` for one input of ``in_shape`` (C, H, W),
    2 x multiply-adds: a convolution 2 Cin Cout k^2 Hout Wout, a transposed one 2 Cin Cout k^2 Hin
    Win. BatchNorm and activations are not counted (as FlopCounterMode does not)."""
    from torch import nn

    c, h, w = in_shape
    out = []
    for mod in module.modules():
        if isinstance(mod, nn.ConvTranspose2d):
            k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
            out.append(2.0 * mod.in_channels * mod.out_channels * k * k * h * w)
            h, w = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
        elif isinstance(mod, nn.Conv2d):
            k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            out.append(2.0 * mod.in_channels * mod.out_channels * k * k * h * w)
        c = getattr(mod, "out_channels", c)
    return out


def flops_per_sample(cfg: Config) -> dict[str, float]:
    """FLOPs per sample of one training step, by the part that computes them.

    With F the forward FLOPs of a part and F1 those of its first layer (the gradient of its input
    is computed only when the input requires one): the discriminator update runs the generator
    forward (F_G, no gradient), the discriminator forward on real and fake images (2 F_D) and their
    backward (weights 2 F_D, inputs 2 (F_D - F1_D)); the generator update runs the generator
    forward and backward (F_G + F_G + F_G - F1_G) and the discriminator forward and its input
    gradients (2 F_D: its weights take none)."""
    import torch

    m = cfg.model
    with torch.device("meta"):
        parts = build(cfg)
    g = layer_flops(parts["generator"], (m.latent_dim, 1, 1))
    d = layer_flops(parts["discriminator"], (m.in_channels, m.image_size, m.image_size))
    fg, fd = sum(g), sum(d)
    return {
        "discriminator": 2 * fd + 2 * fd + 2 * (fd - d[0]) + 2 * fd,
        "generator": fg + 3 * fg - g[0],
    }


SPEC = ModelSpec(
    name="gan",
    config=GANModelConfig,
    build=build,
    loss=None,
    flops_per_sample=flops_per_sample,
    updates=updates,
    evaluate=evaluate,
    generative=Generative(latent=latent, decode=decode, export_part="generator"),
)
