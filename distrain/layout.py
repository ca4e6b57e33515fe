"""A launch's layout, decided once in the driver before anything starts.

Every launcher (``distrain train`` and each torchrun rank before the process group forms, ``launch
local|ray`` before Ray starts, ``submit slurm`` before sbatch, and every ``--dry-run``) calls
``preflight`` with the world sizes the run may use. It refuses, naming the key, whatever would
fail on the workers: a run directory that may not be used, a resume that changes the checkpoint,
missing data paths, more classes than ``model.num_classes``, a tokenizer larger than the
vocabulary, a batch layout that does not multiply out, and data partitions that some size cannot
divide or the data's chunks cannot hold.

``data.partitions`` left unset is derived here, once: the smallest multiple of 64 that every size
divides (24 ranks: 192, which 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96 and 192 ranks also
divide), fewer for a small source (``default_partitions``). The launch hands its workers the config
with the number in it, so it is written into ``config.yaml`` and every checkpoint; a later resume or
resize reads it back from the newest checkpoint instead of deriving it again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distrain.config import (
    Config,
    check_sizes,
    check_topology,
    dp_size,
    elastic_layouts,
    global_batch,
    mesh,
    mesh_line,
)
from distrain.errors import ConfigError, TopologyError


@dataclass(frozen=True)
class Layout:
    """How the data is cut for the launch: ``partitions`` of ``chunks`` chunks and ``rows`` rows
    (the smallest source's), for ``sizes`` ranks; ``how``: where the partition count came from."""

    partitions: int
    how: str
    sizes: tuple[int, ...]
    chunks: int
    rows: int

    def line(self) -> str:
        n = min(self.sizes)
        per = f"{self.partitions // n} partition(s) and ~{self.rows // n:,} rows a rank at {n} rank(s)"
        if max(self.sizes) != n:
            m = max(self.sizes)
            per += f", {self.partitions // m} and ~{self.rows // m:,} at {m}"
        return (
            f"data: {self.partitions} partitions ({self.how}) of {self.chunks:,} chunks and {self.rows:,} rows; "
            f"{per}; resumable on {', '.join(map(str, divisors(self.partitions)[:12]))}"
            + (" ..." if len(divisors(self.partitions)) > 12 else "")
            + " ranks"
        )


def divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def launch_sizes(cfg: Config) -> tuple[list[int], str]:
    """The world sizes a Ray launch of ``cfg`` may train on, and the key they come from."""
    c = cfg.cluster
    if c.elastic:
        return list(range(c.min_workers, c.max_workers + 1)), (
            f"cluster.workers={{min: {c.min_workers}, max: {c.max_workers}}}"
        )
    return [c.workers], f"cluster.workers={c.workers}"


def process_sizes() -> tuple[list[int], str]:
    """``distrain train``'s world: one process, or torchrun's WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return [world], (f"WORLD_SIZE={world} (torchrun)" if "RANK" in os.environ else "one process")


def with_partitions(cfg: Config, k: int) -> Config:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"partitions": k})})


def _refuse_tp_resize(cfg: Config, sizes: list[int], saved: dict | None, origin: str) -> None:
    """A tensor-parallel run resumes only on the world size that saved its newest checkpoint."""
    was = (saved or {}).get("world_size")
    if cfg.parallel.tensor_parallel > 1 and was and any(n != was for n in sizes):
        raise TopologyError(
            f"{origin}: the run's newest checkpoint in {cfg.run.run_dir} was saved by {was} ranks with "
            f"parallel.tensor_parallel={cfg.parallel.tensor_parallel}, and a tensor-parallel checkpoint resumes on "
            f"the world size that saved it (DeepSpeed loads AutoTP shards as they were cut); launch it on {was} ranks"
        )


def _check_partitions(cfg: Config, worlds: list[int], sizes: list[int], recorded: bool, origin: str) -> None:
    """``data.partitions`` against every world size (``worlds``) and data-parallel size (``sizes``)."""
    k = cfg.data.partitions
    bad = [n for n in sizes if k % n]
    if bad and recorded:
        raise TopologyError(
            f"{origin}: data.partitions={k} was fixed at the run's first launch (recorded in its checkpoints "
            f"in {cfg.run.run_dir}), and {', '.join(map(str, bad[:6]))} rank(s) do not divide it: this run resumes on "
            f"{', '.join(map(str, divisors(k)))} ranks; launch it on one of them, or start a new run (another run.dir)"
        )
    if cfg.cluster.elastic and len(worlds) > 1:
        check_sizes(cfg, k)
    else:
        for w in worlds:
            check_topology(cfg, w)
        for n in sizes:
            if cfg.data.engine == "torch" and cfg.data.num_workers > k // n:
                raise ConfigError(
                    f"data.num_workers={cfg.data.num_workers} but each of {n} ranks reads data.partitions / "
                    f"world size = {k // n} partitions; set data.num_workers <= {k // n} or raise data.partitions"
                )


def decide(cfg: Config, sizes: list[int], origin: str, run_dir: bool = True) -> tuple[Config, Layout]:
    """``cfg`` with ``data.partitions`` decided (the user's, the run's recorded one, or derived for
    ``sizes``) and checked against the data and every size; the layout. Reads the data's manifests
    (cached) and, with ``run_dir``, checks the run directory and reads the newest checkpoint's config."""
    from distrain.checkpoint import check_launch
    from distrain.data import DataPipeline
    from distrain.data.plan import default_partitions

    given, saved = cfg.data.partitions, None
    if run_dir:  # a resume takes the partitions the run recorded
        cfg, saved = check_launch(cfg.run.run_dir.resolve(), cfg)
    for n in sizes:
        mesh(cfg, n)  # sp x tp divides every size
    _refuse_tp_resize(cfg, sizes, saved, origin)
    worlds = sizes
    sizes = sorted({dp_size(cfg, n) for n in sizes})  # the data is read by the data-parallel ranks
    recorded = given is None and cfg.data.partitions is not None
    pipe = DataPipeline(cfg, 0, 1) if cfg.data.partitions else None
    if pipe is None:
        from distrain.data import train_manifests

        k = default_partitions(train_manifests(cfg)[0], sizes, origin)
        cfg = with_partitions(cfg, k)
        pipe = DataPipeline(cfg, 0, 1)  # the tokenizer and the chunks, with the count it will use
    pipe.close()
    if saved is not None and "corpus" in saved:  # a resume on changed data is refused naming the file
        pipe.corpus.load_state_dict(saved["corpus"])
    k = cfg.data.partitions
    _check_partitions(cfg, worlds, sizes, recorded, origin)
    how = (
        "data.partitions"
        if given is not None
        else "recorded at the run's first launch"
        if recorded
        else f"derived for {origin}"
    )
    chunks = min(int(m.chunks.sum()) for m in pipe.manifests)
    rows = min(m.total for m in pipe.manifests)
    return cfg, Layout(k, how, tuple(sizes), chunks, rows)


def preflight(cfg: Config, sizes: list[int], origin: str) -> tuple[Config, list[str]]:
    """Every check that can refuse the launch, before anything starts or is written: ``cfg`` as the
    workers get it (``data.partitions`` decided) and what the checks found, a line each."""
    from distrain.data import eval_manifest

    cfg, layout = decide(cfg, sizes, origin)
    eval_manifest(cfg)  # data.eval_path exists and fits the model
    init = cfg.model.init_from
    if init and "://" not in init and not Path(init).exists():
        raise ConfigError(
            f"model.init_from={init}: no such file or directory; give a HF model directory, a .safetensors "
            "or a .pt/.pth file, or drop model.init_from"
        )
    from distrain.samples import check_scorer

    check_scorer(cfg)
    c, micro = cfg.cluster, cfg.train.micro_batch_size
    if c.elastic and len(sizes) > 1:
        batch = elastic_layouts(cfg, layout.partitions)
    else:
        n = sizes[0]
        dp = dp_size(cfg, n)
        of = f"{dp} data-parallel rank(s)" if dp != n else f"{n} rank(s)"
        batch = f"global batch {global_batch(cfg, n)}: {of} x micro batch {micro} x grad_accum {cfg.parallel.grad_accum}"
    run_dir = cfg.run.run_dir.resolve()
    resume = cfg.checkpoint.resume and (run_dir / "checkpoints").is_dir()
    return cfg, [
        f"run dir {run_dir} ({'resume' if resume else 'new run'})",
        f"ranks: {', '.join(map(str, sizes[:8]))}{' ...' if len(sizes) > 8 else ''} ({origin}); {batch}",
        "; ".join(mesh_line(cfg, n) for n in sizes[:4]) + (" ..." if len(sizes) > 4 else ""),
        layout.line(),
        "checks passed: config, run directory, data paths and classes, batch layout and data partitions at every size",
    ]
