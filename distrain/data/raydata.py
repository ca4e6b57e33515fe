"""``data.engine: ray``: the same sources read, decoded and tokenized by Ray Data on CPU actors,
with a position that resumes exactly.

Ray Data's iterators cannot be resumed, so the order is made resumable instead: each rank's stream
is a Ray dataset over that rank's files in the epoch's order (the same seeded order as the torch
engine), each file read by one actor call that emits its rows in a seeded block-shuffled order.
``execution_options.preserve_order`` keeps that order, so a position is (epoch, file k, row
position p, token offset) for text and (epoch, sample position) for images; a resume builds the
dataset from file k (or sample p) on and skips nothing already trained on. Packing into windows
happens in the training process, so no token is dropped or repeated between windows.

Each worker reads its own deterministic share of the files instead of Ray Train's
``get_dataset_shard`` (whose ``streaming_split`` hands blocks to whichever worker asks first, an
assignment that no saved position could reproduce).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from distrain.data.sources import DataError, read_rows
from distrain.data.text import ERROR_KINDS, _permutation

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS, or start a local Ray on a loopback address (no dashboard) for this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # 127.0.0.1 itself is rewritten by Ray to the machine's outward address; another loopback address stays
        ray.init(
            address="local", _node_ip_address=os.environ.get("DISTRAIN_RAY_NODE_IP", "127.0.0.2"), **kwargs
        )


def _context() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the position: keep it
    ctx.enable_progress_bars = False


# ------------------------------------------------------------------------------------------- text
class TokenizeFile:
    """Ray Data actor: one file -> its rows (seeded block-shuffled order) as token arrays."""

    def __init__(
        self,
        fmt: str,
        tokenizer: str,
        text_field: str,
        seed: int,
        shuffle: bool,
        block: int,
        rank: int,
        world: int,
        by_file: bool,
    ):
        from distrain.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer)
        self.fmt, self.field = fmt, ("text" if fmt == "txt" else text_field)
        self.seed, self.shuffle, self.block = seed, shuffle, block
        self.rank, self.world, self.by_file = rank, world, by_file

    def _ordered(self, file: str, epoch: int):
        rows = [r for r in read_rows(file, self.fmt) if self.by_file or r.index % self.world == self.rank]
        if not self.shuffle:
            return rows
        out = []
        for b in range(0, len(rows), self.block):
            chunk = rows[b : b + self.block]
            out += [chunk[i] for i in _permutation(len(chunk), self.seed, file, epoch, b)]
        return out

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for pos, row in enumerate(self._ordered(item["file"], item["epoch"])):
            if pos < item["start"]:
                continue
            base = {"k": item["k"], "pos": pos, "where": row.where}
            if row.error is not None:
                yield {**base, "kind": "malformed", "msg": row.error, "ids": np.zeros(0, np.int64)}
            elif self.field not in row.value:
                msg = f"no field {self.field!r} (fields: {sorted(row.value)}); set data.text_field"
                yield {**base, "kind": "missing_field", "msg": msg, "ids": np.zeros(0, np.int64)}
            elif not isinstance(row.value[self.field], str) or not row.value[self.field]:
                yield {
                    **base,
                    "kind": "empty",
                    "msg": f"field {self.field!r} is empty or not a string",
                    "ids": np.zeros(0, np.int64),
                }
            else:
                ids = np.append(self.tok.encode(row.value[self.field]), self.tok.eos_id)
                yield {**base, "kind": "", "msg": "", "ids": ids}


class RayPackedText:
    """Endless stream of ``{"input_ids": [batch, seq_len], "data_errors": [4]}`` for one rank."""

    def __init__(
        self,
        files: list[str],
        fmt: str,
        tokenizer,
        cfg,
        rank: int,
        world: int,
        actors: int,
        start_epoch: int = 0,
    ):
        d = cfg.data
        self.files, self.fmt, self.tok = list(files), fmt, tokenizer
        self.seq_len, self.batch_size = d.seq_len, cfg.train.micro_batch_size
        self.rank, self.world, self.seed, self.shuffle = rank, world, cfg.run.seed, d.shuffle
        self.by_file = len(self.files) % world == 0
        self.actor_args = dict(
            fmt=fmt,
            tokenizer=d.tokenizer,
            text_field=d.text_field,
            seed=cfg.run.seed,
            shuffle=d.shuffle,
            block=d.shuffle_block,
            rank=rank,
            world=world,
            by_file=self.by_file,
        )
        self.on_error, self.actors = d.on_error, actors
        self.state = {"epoch": start_epoch, "k": 0, "pos": 0, "offset": 0}

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = {k: int(state[k]) for k in ("epoch", "k", "pos", "offset")}

    def _epoch_files(self, epoch: int) -> list[str]:
        files = (
            [self.files[i] for i in _permutation(len(self.files), self.seed, 0, epoch)]
            if self.shuffle
            else self.files
        )
        return files[self.rank :: self.world] if self.by_file else files

    def _rows(self, epoch: int, k0: int, pos0: int):
        import ray

        files = self._epoch_files(epoch)
        items = [
            {"k": k, "file": files[k], "epoch": epoch, "start": pos0 if k == k0 else 0}
            for k in range(k0, len(files))
        ]
        if not items:
            return iter(())
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
            TokenizeFile,
            fn_constructor_kwargs=self.actor_args,
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=0.5,
        )
        return ds.iter_rows()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ensure_ray()
        _context()
        errors = np.zeros(len(ERROR_KINDS), dtype=np.int64)
        rows_out: list[np.ndarray] = []
        buf: list[np.ndarray] = []
        have = 0
        st = self.state
        epoch, k0, pos0, offset = st["epoch"], st["k"], st["pos"], st["offset"]
        while True:
            produced = False
            for r in self._rows(epoch, k0, pos0):
                if r["kind"]:
                    if self.on_error == "fail":
                        raise DataError(f"{r['where']}: {r['msg']}; fix the row or set data.on_error=skip")
                    errors[ERROR_KINDS.index(r["kind"])] += 1
                    log.warning("skipping %s: %s (data.on_error=skip)", r["where"], r["msg"])
                    offset = 0
                    continue
                toks = np.asarray(r["ids"], dtype=np.int64)
                off, offset = offset, 0
                while have + len(toks) - off >= self.seq_len:
                    need = self.seq_len - have
                    buf.append(toks[off : off + need])
                    off += need
                    rows_out.append(np.concatenate(buf))
                    buf, have = [], 0
                    if len(rows_out) == self.batch_size:
                        produced = True
                        self.state = {"epoch": epoch, "k": int(r["k"]), "pos": int(r["pos"]), "offset": off}
                        yield {
                            "input_ids": torch.from_numpy(np.stack(rows_out)),
                            "data_errors": torch.from_numpy(errors.copy()),
                        }
                        rows_out, errors[:] = [], 0
                if off < len(toks):
                    buf.append(toks[off:])
                    have += len(toks) - off
            if not produced and k0 == 0 and pos0 == 0:
                raise DataError(f"data: an epoch of {self.files[:3]} gives no full batch on rank {self.rank}")
            epoch, k0, pos0 = epoch + 1, 0, 0


# ----------------------------------------------------------------------------------------- images
@functools.lru_cache(maxsize=4)
def _image_dataset(cfg_json: str, rank: int, world: int):
    from distrain.config import Config
    from distrain.data import DataPipeline

    cfg = Config.model_validate_json(cfg_json)
    return DataPipeline(cfg, rank, world)._image_dataset(cfg.data.train_path, train=True)


class DecodeImages:
    """Ray Data actor: keys -> decoded, augmented images (seeded per sample, as the torch engine)."""

    def __init__(self, cfg_json: str, rank: int, world: int):
        self.ds = _image_dataset(cfg_json, rank, world)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = self.ds.__getitems__(list(zip(batch["i"].tolist(), batch["epoch"].tolist(), strict=True)))
        return {
            "images": np.stack([s[0].numpy() for s in samples]),
            "labels": np.asarray([s[1] for s in samples], dtype=np.int64),
            "errors": np.stack([s[2] for s in samples]),
        }


class RayImages:
    """Endless stream of ``{"images", "labels", "data_errors"}`` batches for one rank."""

    def __init__(self, cfg, rank: int, world: int, actors: int, start_epoch: int = 0):
        from distrain.data.vision import EpochSampler

        self.cfg_json = cfg.model_dump_json()
        n = len(_image_dataset(self.cfg_json, rank, world))
        self.sampler = EpochSampler(n, rank, world, cfg.run.seed, cfg.data.shuffle)
        self.batch_size, self.rank, self.world, self.actors = cfg.train.micro_batch_size, rank, world, actors
        self.state = {"epoch": start_epoch, "pos": 0}

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = {"epoch": int(state["epoch"]), "pos": int(state["pos"])}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import ray

        ensure_ray()
        _context()
        epoch, pos = self.state["epoch"], self.state["pos"]
        b = self.batch_size
        while True:
            order = self.sampler._order(epoch)
            order = order[: len(order) // b * b]  # whole batches only, as drop_last
            keys = [{"i": i, "epoch": epoch} for i in order[pos:]]
            if keys:
                ds = ray.data.from_items(keys).map_batches(
                    DecodeImages,
                    fn_constructor_kwargs={"cfg_json": self.cfg_json, "rank": self.rank, "world": self.world},
                    batch_size=b,
                    compute=ray.data.ActorPoolStrategy(size=self.actors),
                    num_cpus=0.5,
                )
                for batch in ds.iter_batches(batch_size=b, batch_format="numpy", drop_last=True):
                    pos += b
                    self.state = {"epoch": epoch, "pos": pos}
                    yield {
                        "images": torch.tensor(batch["images"]),
                        "labels": torch.tensor(batch["labels"]),
                        "data_errors": torch.tensor(batch["errors"].sum(0)),
                    }
            epoch, pos = epoch + 1, 0
