"""The step loop reads no tensor value into Python except on log steps: on a GPU each such read
(``.item()``, ``.cpu()``, ``float(t)``...) blocks the CPU until the step's kernels finish. On the CPU
only the structure can be checked: every read made from distrain's own step code is recorded with
the step it happened at. ``tests/test_gpu.py`` checks the same on CUDA with torch's sync debug mode."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from distrain.config import load_config
from distrain.train import run, setup
from tests.conftest import CONFIGS, REPO

# the step code: the loop, accounting, distrain's collectives, tracking and checkpoint flags (the
# data pipeline works on host batches before they are copied to the device; models are pure)
STEP_CODE = [
    REPO / "distrain" / p for p in ("trainer.py", "metrics", "parallel", "tracking.py", "checkpoint.py")
]
TORCH_DIR = str(Path(torch.__file__).parent)
READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class HostReads(TorchFunctionMode):
    """Each read of a tensor's value made from STEP_CODE: (trainer.step at the time, where, what)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.reads = trainer, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back  # torch's own wrappers (Tensor.__float__ -> handle_torch_function)
            where = Path(frame.f_code.co_filename) if frame is not None else None
            if where is not None and any(where == p or p in where.parents for p in STEP_CODE):
                self.reads.append((self.trainer.step, f"{where.relative_to(REPO)}:{frame.f_lineno}", name))
        return func(*args, **(kwargs or {}))


def test_no_tensor_read_off_log_steps(in_workdir, tmp_path):
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            "train.steps=12",
            "train.log_every=4",
            "train.eval_every=0",
            "parallel.grad_accum=2",
            "checkpoint.at_end=false",
            "tracking.progress_bar=false",
        ],
    )
    session = setup(cfg)
    mode = HostReads(session.trainer)
    with mode:
        summary = run(cfg, session)
    assert summary["status"] == "completed"
    # trainer.step is k-1 while step k computes and k once it is done: log steps 4, 8, 12 may read
    # from s = 3 to 4, 7 to 8 and 11 to 12; step 1 (s = 0) shares its s with the set-up
    off_log = [r for r in mode.reads if r[0] in (1, 2, 5, 6, 9, 10)]
    assert not off_log, "tensor values read into Python off log steps:\n" + "\n".join(map(str, off_log))
    on_log = [r for r in mode.reads if r[0] in (4, 8, 12) and r[1].startswith("distrain/trainer.py")]
    assert on_log, f"the recorder saw no read on a log step (it would miss the others too): {mode.reads}"
