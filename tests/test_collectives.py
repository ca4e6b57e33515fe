"""distrain's own collectives (stop agreement, metric sums and means, checkpoint flags, gathers) are
right whatever backend the default process group has: under NCCL it has none for CPU tensors."""

from __future__ import annotations

import ast
import json
import subprocess

import pytest

from tests.conftest import CONFIGS, REPO, torchrun_cmd

# A 2-rank job whose default group has no CPU backend, as a job under NCCL has: a collective on a
# CPU tensor there fails with "No backend type associated with device type cpu". distrain's own
# collectives must not touch that group; each part that issues one runs here.
WORKER = r"""
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("cuda:gloo")  # the default group serves CUDA tensors only, as NCCL does
try:
    dist.all_reduce(torch.ones(1))
    raise SystemExit("the default group took a CPU tensor: this job does not reproduce NCCL")
except RuntimeError as exc:
    assert "No backend type associated with device type cpu" in str(exc), exc

from distrain.checkpoint import resume_plan
from distrain.config import load_config
from distrain.metrics import Meters
from distrain.parallel import init_distributed

cfg = load_config(sys.argv[1], ["cluster.workers=2", "metrics.cpu_watts=20", "run.device=cpu"])
info = init_distributed(cfg)  # the default group exists already (a launcher made it): kept as it is
comm, rank = info.comm, info.rank
out = {"rank": rank, "backend": dist.get_backend()}
out["gather"] = comm.gather({"rank": rank})
out["sum"] = comm.sum(torch.tensor([rank + 1, 10 * rank], dtype=torch.long)).tolist()
out["mean"] = comm.mean(torch.tensor(float(rank)))
out["broadcast"] = comm.broadcast({"from": rank}, src=0)
comm.barrier()

# the per-step agreement: rank 1 asks to stop after step 3; every rank acts at one boundary
agreement = comm.agreement(2)
stopped_at = None
for step in range(1, 10):
    flags = agreement.exchange([2.0 if (rank == 1 and step >= 3) else 0.0, 0.0])
    if flags[0]:
        stopped_at = step
        break
agreement.close()
out["stopped_at"] = stopped_at

meters = Meters(cfg, info, per_step_samples=16, tokens_per_sample=128, flops_per_sample=1e6)
meters.start(comm.gather({"rank": rank, "host": "node-%d" % rank, "gpu": None}))  # peak probe, energy labels
meters.step_done()
rec = meters.record()  # the energy of every node summed
out["energy_source"], out["energy_j"] = rec.get("energy_source"), rec.get("energy_j")
out["peak"] = meters.peak
out["plan"] = resume_plan(Path(sys.argv[2]), comm)  # rank 0 decides, every rank learns it
# a file per rank: two ranks' lines on torchrun's shared stdout can interleave
(Path(sys.argv[2]).parent / f"result-{rank}.json").write_text(json.dumps(out))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as the CLI leaves: no interpreter teardown of the process groups' native threads
"""


@pytest.mark.world_size
def test_host_collectives_run_where_the_default_group_has_no_cpu_backend(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "ckpts").mkdir()
    p = subprocess.run(
        torchrun_cmd(str(script), str(CONFIGS / "gpt-cpu-tiny.yaml"), str(tmp_path / "ckpts")),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["backend"] == "cuda:gloo"
        assert r["gather"] == [{"rank": 0}, {"rank": 1}]
        assert r["sum"] == [3, 10]
        assert r["mean"] == pytest.approx(0.5)
        assert r["broadcast"] == {"from": 0}
        assert r["stopped_at"] == 4  # posted after step 3, agreed by all at the next boundary
        assert r["energy_source"] == "estimated"
        assert r["peak"] > 0
        assert r["plan"] is None
    assert results[0]["peak"] == results[1]["peak"]  # the probe is averaged: one figure for the job
    assert results[0]["energy_j"] == results[1]["energy_j"]  # both nodes' readers, summed


_COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "barrier",
    "monitored_barrier",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
}


def test_every_collective_distrain_issues_is_in_one_module():
    """No torch.distributed collective outside distrain/parallel/collectives.py: each one there is
    written for the host group (gloo), so none can ride a CUDA-only group by accident."""
    owner = REPO / "distrain" / "parallel" / "collectives.py"
    found = []
    for path in sorted((REPO / "distrain").rglob("*.py")):
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                base = ast.unparse(node.func.value)
                if node.func.attr in _COLLECTIVES and base in ("dist", "torch.distributed", "distributed"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}")
    assert not found, "collectives outside distrain/parallel/collectives.py:\n" + "\n".join(found)
    assert owner.exists()
