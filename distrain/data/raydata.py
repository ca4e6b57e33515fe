"""``data.engine: ray``: rows decoded and tokenized by Ray actors, in the order of the same plan.

The training process reads its partitions' rows (front to back, as the torch engine does) and hands
them in chunks to ``data.ray_actors`` long-lived Ray actors that run the same preparation as the
torch engine (``TokenizeRows`` / ``DecodeImages``); the results come back per partition in order and
are packed in the training process by the same ``Partition``. The position is therefore the plan's
cursor, and a resume is exact on any world size, like the torch engine's.

Each partition keeps one chunk in flight ahead of what the rank consumes, so the actors work while
the model trains; demand is per partition, so partitions whose documents are short (more rows per
window) are read further ahead without the others piling up.
"""

from __future__ import annotations

import logging
import os
from collections import deque

import numpy as np
import torch

from distrain.data.plan import Partition, Prepared

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


class Preprocess:
    """Ray actor: documents -> prepared rows (token ids, or decoded and augmented images)."""

    def __init__(self, prepare):
        self.prepare = prepare

    def run(self, docs) -> list[Prepared]:
        out = []
        for doc in docs:
            p = self.prepare(doc)
            if p.units is not None and isinstance(p.units, list):  # images: tensors travel as arrays
                p = Prepared([(img.numpy(), label) for img, label in p.units])
            out.append(p)
        return out


class RayFill:
    """Fills the assembler's queue of one partition from the actors' results."""

    def __init__(self, parts: list[Partition], prepare, actors: int, images: bool, mb: int):
        import ray

        ensure_ray()
        self.parts, self.images = parts, images
        # chunks: a few samples per partition in flight, fewer as a rank has more partitions
        self.chunk = max(1, min(16, -(-4 * mb // len(parts)))) if images else 8
        remote = ray.remote(num_cpus=0.5)(Preprocess)
        self.actors = [remote.remote(prepare) for _ in range(actors)]
        self.inflight: list[deque] = [deque() for _ in parts]
        self.next_actor = 0
        for i in range(len(parts)):
            self._submit(i)

    def _submit(self, i: int) -> None:
        docs = self.parts[i].read(self.chunk)
        if docs:
            actor = self.actors[self.next_actor % len(self.actors)]
            self.next_actor += 1
            self.inflight[i].append((docs, actor.run.remote(docs)))

    def __call__(self, i: int, push) -> None:
        import ray

        if not self.inflight[i]:
            self._submit(i)
        docs, ref = self.inflight[i].popleft()
        self._submit(i)  # the next chunk of this partition, while this one is packed and trained on
        try:
            results = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause if isinstance(exc.cause, Exception) else exc from None
        part = self.parts[i]
        for doc, p in zip(docs, results, strict=True):
            if self.images and p.units is not None:
                p = Prepared([(torch.from_numpy(np.array(img)), label) for img, label in p.units])
            for s in part.take(doc, p):
                push(i, s)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
