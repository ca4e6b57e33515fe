"""distrain's own collectives, in one place: the per-step stop agreement, metric sums and means,
checkpoint flags and gathers of small objects. DeepSpeed's collectives are DeepSpeed's and stay on
the default (fast) group.

Every value here lives on the host and travels on a gloo group of its own, created once per job
(``HostComm.create``). Under NCCL the default group has no backend for CPU tensors at all, and its
object collectives would stage through the GPU. A group of its own rather than a
``cpu:gloo,cuda:nccl`` default group, because:
- it holds whatever made the default group (DeepSpeed's ``init_distributed``, Ray Train's
  ``TorchConfig``, torchrun, a user's own ``init_process_group``) and whichever backend it has;
- these collectives never touch the GPU or queue behind a step's gradient traffic on NCCL's stream;
- the CPU tests (gloo) run exactly the code a GPU cluster runs.
Its cost is the same as the mixed backend's: one gloo connection to every other rank.

Every call is collective: all ranks make the same calls in the same order. On one process each is
a plain local operation.

One exception rides a device group: ``device_sum``, the per-micro-batch sums of a sequence-parallel
loss, which stay on the device (no sync on the hot path) on the group DeepSpeed built for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def device_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """The element-wise sum of a device tensor over ``group`` (one of DeepSpeed's groups, of the
    default backend: NCCL on CUDA, gloo on the CPU), out of place and outside autograd."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class HostComm:
    """Collectives on host values for one job: this process is ``rank`` of ``world_size``."""

    def __init__(self, world_size: int = 1, rank: int = 0, group: Any = None):
        self.world_size, self.rank, self.group = world_size, rank, group

    @classmethod
    def create(cls) -> HostComm:
        """Collective: the host group of the job whose default process group exists (or one process)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls()
        return cls(dist.get_world_size(), dist.get_rank(), dist.new_group(backend="gloo"))

    @staticmethod
    def _host(t: torch.Tensor) -> torch.Tensor:
        # an internal invariant: a device tensor here would have to be copied (a sync) by the caller,
        # on a step where that is allowed (a log step)
        assert t.device.type == "cpu", f"host collective given a {t.device} tensor"
        return t.detach().clone().contiguous()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new CPU tensor of ``t``'s dtype)."""
        t = self._host(t)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def mean(self, t: torch.Tensor) -> float:
        """The mean over ranks of a one-element tensor, as a float."""
        return float(self.sum(t.double()).item()) / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def agreement(self, width: int) -> StepAgreement:
        return StepAgreement(self, width)


class StepAgreement:
    """Small per-step flags (a stop request, rank 0's clock saying a save is due) agreed by every
    rank without stalling the step. ``exchange`` posts this rank's flags, reduced with MAX in the
    background, and returns the reduction posted at the previous call: every rank acts on the same
    values at the same step boundary, one step after a flag is raised, and the reduction runs while
    the next step computes. On one process there is nothing to agree and no lag."""

    def __init__(self, comm: HostComm, width: int):
        self.comm, self.width = comm, width
        self._pending: tuple[Any, torch.Tensor] | None = None

    def exchange(self, flags: Sequence[float]) -> list[float]:
        if len(flags) != self.width:
            raise ValueError(f"StepAgreement of width {self.width} given {len(flags)} flags")
        if self.comm.world_size == 1:
            return [float(f) for f in flags]
        posted = torch.tensor([float(f) for f in flags], dtype=torch.float64)
        work = dist.all_reduce(posted, op=dist.ReduceOp.MAX, group=self.comm.group, async_op=True)
        previous, self._pending = self._pending, (work, posted)
        if previous is None:
            return [0.0] * self.width
        previous[0].wait()
        return previous[1].tolist()

    def close(self) -> list[float]:
        """Wait for the reduction in flight (every rank, at the end of the loop); returns it."""
        if self._pending is None:
            return [0.0] * self.width
        work, posted = self._pending
        self._pending = None
        work.wait()
        return posted.tolist()
