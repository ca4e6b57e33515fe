"""``distrain data prepare``: write the small data sets the tiny configs train on, from material
that installed packages ship (no download): Python's own pydoc topic texts and scikit-learn's
handwritten digits."""

from __future__ import annotations

import json
from pathlib import Path


def prepare_pydoc(out: Path, shards: int = 4, val_every: int = 10) -> Path:
    """pydoc topics as jsonl documents: ``train-0000{i}.jsonl`` shards and ``val.jsonl``."""
    from pydoc_data.topics import topics

    root = out / "pydoc"
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(topics)
    train = [n for i, n in enumerate(names) if i % val_every != val_every - 1]
    val = [n for i, n in enumerate(names) if i % val_every == val_every - 1]
    for s in range(shards):
        with open(root / f"train-{s:05d}.jsonl", "w") as f:
            for n in train[s::shards]:
                f.write(json.dumps({"id": n, "text": topics[n]}) + "\n")
    with open(root / "val.jsonl", "w") as f:
        for n in val:
            f.write(json.dumps({"id": n, "text": topics[n]}) + "\n")
    return root


def prepare_digits(out: Path, val_every: int = 5) -> Path:
    """scikit-learn's 1797 8x8 digits as PNGs in ImageFolder layout: ``train/<digit>/`` and ``val/<digit>/``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = out / "digits"
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=False)):
        split = "val" if i % val_every == val_every - 1 else "train"
        d = root / split / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L").save(d / f"{i:04d}.png")
    return root


def prepare(out: str | Path = "data") -> list[Path]:
    out = Path(out)
    return [prepare_pydoc(out), prepare_digits(out)]
