"""A convolutional variational autoencoder (Kingma & Welling 2013, arXiv:1312.6114) with a Gaussian
latent, for square images of 32 or 64 pixels.

The training loss is the negative ELBO with a weighted KL term (Higgins et al. 2017's beta-VAE),
per image: ``sum((x - x')^2) / 2 + beta_t KL(q(z|x) || N(0, I))``, the reconstruction a Gaussian
likelihood of unit variance in the data's normalised space. ``beta_t`` warms up linearly from 0 to
``model.beta`` over ``model.kl_warmup_steps`` steps (Bowman et al. 2015); the warm-up's position is
the model's own state, saved in every checkpoint. The KL term is computed in fp32. Eval reports the
negative ELBO at beta 1 (``eval_loss``), the reconstruction's mean squared error per pixel
(``eval_recon_mse``) and the KL (``eval_kl``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from distrain.config.schema import ModelSection
from distrain.models import Generative, ModelSpec, Update

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distrain.config import Config


class VAEModelConfig(ModelSection):
    batch_kind: ClassVar[Literal["tokens", "images"]] = "images"

    name: Literal["vae"] = Field("vae", description="Convolutional VAE with a Gaussian latent.")
    image_size: Literal[32, 64] = Field(32, description="Square image size (32 or 64).")
    in_channels: Literal[1, 3] = Field(
        3, description="Image channels, as the data gives them (greyscale images are read as 1)."
    )
    num_classes: int = Field(10, ge=1, description="Classes of the data's labels (read and checked; unused).")
    latent_dim: int = Field(32, ge=1, description="Size of the Gaussian latent.")
    width: int = Field(
        32, ge=4, description="Feature maps of the encoder's first and the decoder's last layer."
    )
    beta: float = Field(1.0, ge=0.0, description="Weight of the KL term after the warm-up (1: the ELBO).")
    kl_warmup_steps: int = Field(
        0, ge=0, description="Steps over which the KL weight rises linearly from 0 to model.beta (0: none)."
    )


def _vae_class():
    import torch
    from torch import nn

    class VAE(nn.Module):
        """``encoder``: images -> features; ``to_latent``: features -> (mu, log variance);
        ``decoder``: latents -> images in [-1, 1]."""

        def __init__(self, m: VAEModelConfig):
            super().__init__()
            w, c, s = m.width, m.in_channels, m.image_size // 8
            self.latent_dim = m.latent_dim
            self.encoder = nn.Sequential(
                nn.Conv2d(c, w, 4, 2, 1),
                nn.ReLU(True),
                nn.Conv2d(w, 2 * w, 4, 2, 1),
                nn.ReLU(True),
                nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
                nn.ReLU(True),
                nn.Flatten(1),
            )
            self.to_latent = nn.Linear(4 * w * s * s, 2 * m.latent_dim)
            self.decoder = nn.Sequential(
                nn.Linear(m.latent_dim, 4 * w * s * s),
                nn.ReLU(True),
                nn.Unflatten(1, (4 * w, s, s)),
                nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1),
                nn.ReLU(True),
                nn.ConvTranspose2d(2 * w, w, 4, 2, 1),
                nn.ReLU(True),
                nn.ConvTranspose2d(w, c, 4, 2, 1),
                nn.Tanh(),
            )

        def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mu, logvar = self.to_latent(self.encoder(x)).chunk(2, dim=1)
            return mu, logvar

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(reconstruction, mu, log variance), with a latent drawn by the reparameterisation."""
            mu, logvar = self.encode(x)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.decoder(z), mu, logvar

    return VAE


def build(cfg: Config) -> nn.Module:
    return _vae_class()(cfg.model)


def decoder_module(cfg: Config) -> nn.Module:
    """The decoder alone (what ``distrain export`` writes): latents -> images."""
    return build(cfg).decoder


class KLWarmup:
    """The KL weight's warm-up: the steps it has advanced and the weight it has reached."""

    def __init__(self, cfg: Config):
        self.beta, self.warmup, self.steps = cfg.model.beta, cfg.model.kl_warmup_steps, 0

    @property
    def weight(self) -> float:
        return self.beta if self.warmup == 0 else self.beta * min(1.0, self.steps / self.warmup)

    def after_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def _terms(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: (summed squared error, KL in fp32, the reconstruction)."""
    recon, mu, logvar = model(x)
    err = (recon.float() - x.float()).pow(2).flatten(1).sum(1)
    mu, logvar = mu.float(), logvar.float()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return err, kl, recon


def updates(cfg: Config) -> tuple[Update, ...]:
    def loss(parts, batch: dict[str, Any], warmup: KLWarmup) -> torch.Tensor:
        err, kl, _ = _terms(parts["model"], batch["images"])
        return (0.5 * err + warmup.weight * kl).mean()

    return (Update("model", loss),)


def evaluate(cfg: Config):
    def figures(parts, batch: dict[str, Any], state) -> dict[str, torch.Tensor]:
        x = batch["images"]
        err, kl, _ = _terms(parts["model"], x)
        return {"loss": (0.5 * err + kl).mean(), "recon_mse": err.mean() / x[0].numel(), "kl": kl.mean()}

    return figures


def latent(cfg: Config, n: int, gen: torch.Generator) -> torch.Tensor:
    import torch

    return torch.randn(n, cfg.model.latent_dim, generator=gen)


def decode(parts, z: torch.Tensor) -> torch.Tensor:
    model = parts["model"]
    return model.decoder(z.to(next(model.parameters()).dtype))


def reconstruct(parts, x: torch.Tensor) -> torch.Tensor:
    """The decoded mean latent of each image."""
    model = parts["model"]
    mu, _ = model.encode(x.to(next(model.parameters()).dtype))
    return model.decoder(mu)


def layer_flops(model: nn.Module, image_size: int, in_channels: int) -> list[float]:
    """Forward FLOPs per image of each convolution and linear layer, in order (2 x multiply-adds)."""
    from torch import nn

    from distrain.models.gan import layer_flops as conv_flops

    enc = conv_flops(model.encoder, (in_channels, image_size, image_size))
    lin = [2.0 * m.in_features * m.out_features for m in (model.to_latent, model.decoder[0])]
    s = image_size // 8
    dec = conv_flops(
        nn.Sequential(*list(model.decoder)[3:]), (model.decoder[0].out_features // (s * s), s, s)
    )
    return [*enc, lin[0], lin[1], *dec]


def flops_per_sample(cfg: Config) -> float:
    """Forward F, then the backward: weight gradients F and input gradients F minus the first
    layer's (the images need none)."""
    import torch

    with torch.device("meta"):
        model = build(cfg)
    f = layer_flops(model, cfg.model.image_size, cfg.model.in_channels)
    return 3 * sum(f) - f[0]


SPEC = ModelSpec(
    name="vae",
    config=VAEModelConfig,
    build=build,
    loss=None,
    flops_per_sample=flops_per_sample,
    updates=updates,
    evaluate=evaluate,
    state=KLWarmup,
    generative=Generative(
        latent=latent,
        decode=decode,
        export_part="model",
        export_prefix="decoder.",
        export_module=decoder_module,
        reconstruct=reconstruct,
    ),
)
