"""Samples of a generative model that people can look at, and figures that say whether it learns.

Every eval, ``Samples.write`` decodes a fixed batch of 64 latents (drawn once from ``run.seed``, so
every grid of a run and of its resumes shows the same latents) and rank 0 writes them as an 8 x 8
PNG grid to ``RUN_DIR/samples/stepNNNNNNNN.png`` and to W&B as an image; an autoencoder's grid
adds two rows of held-out images above two rows of their reconstructions.

With ``metrics.sample_scorer`` (a classifier's run directory), 256 further samples from fixed
latents are scored by it: ``sample_confidence`` is the mean top-class probability and
``sample_class_entropy`` the entropy (nats) of the histogram of its top classes, a small analogue of
the Inception Score (Salimans et al. 2016): samples that look like digits are classified with
confidence, and samples of every digit spread over the classes (log 10 = 2.30 at most for digits).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from distrain.errors import ConfigError

log = logging.getLogger(__name__)

GRID = 64  # samples in a grid (8 x 8)
SCORED = 256  # samples scored at each eval


def grid_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step{step:08d}.png"


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Images in the data's normalised space -> [0, 1] pixels (float32, on the CPU)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * s + m).clamp(0, 1)


def save_grid(pixels: torch.Tensor, path: Path) -> Path:
    """An 8-wide PNG grid of ``pixels`` (n, C, H, W in [0, 1]), written atomically."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(pixels, str(tmp), nrow=8, padding=2, format="png")
    tmp.replace(path)
    return path


def check_scorer(cfg) -> None:
    """``metrics.sample_scorer``, before a launch: a generative model, and a classifier run there
    (config.yaml of a resnet and a checkpoint that verifies)."""
    from distrain.checkpoint import newest_valid
    from distrain.config import load_config
    from distrain.models import get_spec

    where = cfg.metrics.sample_scorer
    if not where:
        return
    if get_spec(cfg.model.name).generative is None:
        raise ConfigError(
            f"metrics.sample_scorer scores generated images; model.name={cfg.model.name} generates none: drop it"
        )
    run_dir = Path(where)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"metrics.sample_scorer={where}: no config.yaml there; give the run directory of an image classifier "
            "trained with distrain (model.name=resnet)"
        )
    scfg = load_config(run_dir / "config.yaml")
    if scfg.model.name != "resnet":
        raise ConfigError(
            f"metrics.sample_scorer={where}: a model.name={scfg.model.name} run; the scorer is an image classifier (model.name=resnet)"
        )
    if newest_valid(run_dir / "checkpoints") is None:
        raise ConfigError(
            f"metrics.sample_scorer={where}: no complete, verified checkpoint in {run_dir / 'checkpoints'}; train it first"
        )


class Scorer:
    """A classifier trained by distrain (``model.name=resnet``), loaded from its run directory's
    newest verified checkpoint, that scores generated images."""

    def __init__(self, run_dir: str | Path, device: torch.device):
        from distrain.checkpoint import newest_valid
        from distrain.config import load_config
        from distrain.data.vision import norm_stats
        from distrain.export import checkpoint_weights
        from distrain.models import build_parts

        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.yaml")  # checked before the launch (``check_scorer``)
        found = newest_valid(run_dir / "checkpoints")
        if found is None or cfg.model.name != "resnet":
            raise ConfigError(
                f"metrics.sample_scorer={run_dir}: not a classifier run with a checkpoint that verifies"
            )
        ckpt, manifest = found
        with torch.random.fork_rng():  # the build seeds torch: training's stream is not touched
            model = build_parts(cfg)["model"]
        model.load_state_dict(checkpoint_weights(ckpt, manifest, cfg))
        self.model = model.to(device).eval()
        self.size, self.channels, self.classes = (
            cfg.model.image_size,
            cfg.model.in_channels,
            cfg.model.num_classes,
        )
        self.mean, self.std = norm_stats(cfg)

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class probabilities of images given as [0, 1] pixels (n, C, H, W)."""
        import torch.nn.functional as F

        x = pixels.float()
        if x.shape[1] != self.channels:  # greyscale <-> RGB as the classifier's data was read
            x = x.repeat(1, self.channels, 1, 1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        device = next(self.model.parameters()).device
        return self.model(((x - m) / s).to(device)).float().softmax(1).cpu()

    def score(self, pixels: torch.Tensor) -> dict[str, float]:
        """``sample_confidence`` and ``sample_class_entropy`` of images given as [0, 1] pixels."""
        p = self.probabilities(pixels)
        hist = torch.bincount(p.argmax(1), minlength=self.classes).double() / len(p)
        nz = hist[hist > 0]
        return {
            "sample_confidence": float(p.max(1).values.mean()),
            "sample_class_entropy": float(-(nz * nz.log()).sum()) + 0.0,
        }


class Samples:
    """A generative model's grids and scores at each eval (collective: every rank decodes, as
    ZeRO 3 needs; rank 0 writes and scores)."""

    def __init__(self, cfg, spec, dist_info, run_dir: Path, tracker, data=None):
        from distrain.data.vision import norm_stats

        self.gen, self.dist, self.tracker, self.run_dir = spec.generative, dist_info, tracker, run_dir
        self.mean, self.std = norm_stats(cfg)
        device = dist_info.device
        self.z = self.gen.latent(cfg, GRID, torch.Generator().manual_seed(cfg.run.seed)).to(device)
        self.scorer, self.z_scored = None, None
        if cfg.metrics.sample_scorer:
            self.z_scored = self.gen.latent(cfg, SCORED, torch.Generator().manual_seed(cfg.run.seed + 1)).to(
                device
            )
            if dist_info.is_main:
                self.scorer = Scorer(cfg.metrics.sample_scorer, device)
        self.originals = None
        if self.gen.reconstruct is not None and data is not None:
            batches = data.eval_batches()
            if batches:  # 16 held-out images spread over this rank's eval set (it is read in order)
                images = torch.cat([b["images"] for b in batches])
                self.originals = images[torch.linspace(0, len(images) - 1, 16).long()]

    @contextlib.contextmanager
    def _eval(self, engines: dict[str, Any]):
        """Every part's module in eval mode (BatchNorm's running statistics), without gradients."""
        modules = {k: e.module for k, e in engines.items()}
        for m in modules.values():
            m.eval()
        try:
            with torch.no_grad():
                yield modules
        finally:
            for m in modules.values():
                m.train()

    def write(self, engines: dict[str, Any], step: int) -> dict[str, float]:
        """Collective: the grid of this step (rank 0 writes it) and, with a scorer, the figures
        (rank 0's)."""
        with self._eval(engines) as modules:
            images = [self.gen.decode(modules, self.z)]
            if self.originals is not None:
                recon = self.gen.reconstruct(modules, self.originals.to(self.dist.device))
                images = [self.originals, recon, *images]
            scored = self.gen.decode(modules, self.z_scored) if self.z_scored is not None else None
        if not self.dist.is_main:
            return {}
        pixels = torch.cat([to_pixels(x, self.mean, self.std) for x in images])
        path = save_grid(pixels, grid_path(self.run_dir, step))
        self.tracker.log_image(step, path)
        if self.scorer is None or scored is None:
            return {}
        return self.scorer.score(to_pixels(scored, self.mean, self.std))


def draw(run_dir: str | Path, out: str | Path, step: int | None = None, n: int = 64, seed: int = 0) -> Path:
    """``distrain sample``: ``n`` new samples of a generative run's checkpoint as a PNG grid at ``out``,
    the latents drawn from ``seed``."""
    from distrain.config import load_config
    from distrain.data.vision import norm_stats
    from distrain.export import _checkpoint, checkpoint_weights
    from distrain.models import build_parts, get_spec

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    spec = get_spec(cfg.model.name)
    if spec.generative is None:
        raise ConfigError(
            f"{run_dir} trains model.name={cfg.model.name}, which draws no images; pass --prompt for text"
        )
    ckpt, manifest = _checkpoint(run_dir, step)
    parts = build_parts(cfg)
    part = spec.generative.export_part
    parts[part].load_state_dict(checkpoint_weights(ckpt, manifest, cfg))
    for m in parts.values():
        m.eval()
    with torch.no_grad():
        images = spec.generative.decode(
            parts, spec.generative.latent(cfg, n, torch.Generator().manual_seed(seed))
        )
    mean, std = norm_stats(cfg)
    return save_grid(to_pixels(images, mean, std), Path(out))


def continue_text(
    run_dir: str | Path, prompt: str, step: int | None = None, tokens: int = 64, n: int = 1, seed: int = 0
) -> list[str]:
    """``distrain sample --prompt``: ``n`` continuations of ``prompt`` by a language model's
    checkpoint (sampled at temperature 1 from ``seed``)."""
    from distrain.config import load_config
    from distrain.data.tokenizer import load_tokenizer
    from distrain.export import _checkpoint, checkpoint_weights
    from distrain.models import build_parts

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.batch_kind != "tokens":
        raise ConfigError(
            f"--prompt: {run_dir} trains model.name={cfg.model.name} on images; drop --prompt to draw images"
        )
    ckpt, manifest = _checkpoint(run_dir, step)
    model = build_parts(cfg)["model"]
    model.load_state_dict(checkpoint_weights(ckpt, manifest, cfg), strict=False)
    model.eval()
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = torch.tensor([list(tok.encode(prompt))] * n, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(tokens):
            logits = _logits(model, ids[:, -cfg.data.seq_len :])[:, -1, : tok.vocab_size]
            nxt = torch.multinomial(logits.float().softmax(-1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    return [prompt + tok.decode(row[ids.shape[1] - tokens :].tolist()) for row in ids]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids) if hasattr(model, "generation_config") else model(ids)
    return out.logits if hasattr(out, "logits") else out
