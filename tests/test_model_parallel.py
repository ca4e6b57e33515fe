"""Sequence parallelism (DeepSpeed Ulysses) and tensor parallelism (AutoTP): the same training as
one process, split differently, under torchrun and Ray; its checkpoints, exports and accounting."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, cli, read_jsonl, torchrun_cmd, wandb_history

LLAMA = str(CONFIGS / "llama-cpu-tiny.yaml")
# fp32 (gloo's all-to-all), ZeRO 1 (AutoTP's shards merge through the universal format), a
# vocabulary AutoTP can split, every step logged and two evals
COMMON = [
    "parallel.precision=fp32",
    "parallel.zero_stage=1",
    "model.vocab_size=258",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=2",
]


def _train(run_dir: Path, *args: str, ranks: int = 1, cwd: Path, env: dict | None = None):
    argv = ["train", LLAMA, f"run.dir={run_dir}", *COMMON, *args]
    return cli(*argv, cwd=cwd, env=env, ranks=ranks)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]


def _records(run_dir: Path) -> dict[int, dict]:
    """step -> the newest record of it (a resumed attempt logs its steps again from the checkpoint)."""
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r or "eval_loss" in r}


def assert_same_training(run: Path, ref: Path, steps: int, keys=("loss", "grad_norm", "eval_loss")) -> None:
    """The loss, gradient norm and eval loss at every step within float summation of ``ref``'s."""
    got, want = _records(run), _records(ref)
    assert sorted(got) == sorted(want) and len([s for s in want if "loss" in want[s]]) == steps
    for s in sorted(want):
        for key in keys:
            if key in want[s]:
                assert got[s][key] == pytest.approx(want[s][key], rel=1e-4), (s, key)
    losses = [want[s]["loss"] for s in sorted(want) if "loss" in want[s]]
    assert losses[-1] < losses[0] - 0.3  # it trains


@pytest.fixture(scope="module")
def one(workdir, tmp_path_factory) -> Path:
    """The reference: one process, 8 steps."""
    run_dir = tmp_path_factory.mktemp("mp") / "one"
    _ok(_train(run_dir, "train.steps=8", cwd=workdir))
    _ok(cli("export", run_dir, run_dir / "hf", "--format", "hf", cwd=workdir))
    return run_dir


def _logits(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.arange(64).reshape(2, 32) * 3 % 258
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------ config, torch-free
@pytest.mark.parametrize(
    "overrides, error",
    [
        (["parallel.sequence_parallel=3"], "model.n_head=4 is not divisible"),
        (
            ["parallel.sequence_parallel=2", "model.d_model=96", "model.n_head=6", "model.n_kv_head=3"],
            "model.n_kv_head=3 neither divides",
        ),
        (["parallel.sequence_parallel=2", "data.seq_len=127", "model.max_seq_len=128"], "data.seq_len=127"),
        (["parallel.tensor_parallel=2", "parallel.zero_stage=3"], "zero_stage 0, 1 or 2"),
        (["parallel.tensor_parallel=2"], "model.vocab_size=257 is not divisible"),
        (
            ["parallel.tensor_parallel=2", "model.vocab_size=258", "parallel.zero_stage=0"],
            "zero_stage 1 or 2",
        ),
        (["parallel.tensor_parallel=2", "parallel.sequence_parallel=2"], "do not compose"),
        (
            ["parallel.sequence_parallel=2", "cluster.workers=4", "train.global_batch_size=64"],
            "data-parallel size 2",
        ),
    ],
)
def test_a_mesh_that_cannot_split_the_model_is_refused_naming_the_key(overrides, error):
    from distrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as exc:  # TopologyError is one
        load_config(LLAMA, overrides)
    assert error in str(exc.value)


@pytest.mark.parametrize(
    "config, override, error",
    [
        ("gpt-cpu-tiny.yaml", "parallel.sequence_parallel=2", "model.arch=gpt2 cannot be split"),
        ("gpt-cpu-tiny.yaml", "parallel.tensor_parallel=2", "model.arch=gpt2 cannot be split"),
        ("resnet-cpu-tiny.yaml", "parallel.tensor_parallel=2", "cannot split model.name=resnet"),
    ],
)
def test_models_without_a_split_refuse_sp_and_tp(config, override, error):
    from distrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=error):
        load_config(CONFIGS / config, [override])


def test_the_batch_and_the_data_are_counted_in_data_parallel_ranks():
    from distrain.config import ConfigError, check_topology, dp_size, global_batch, load_config, mesh_line
    from distrain.errors import TopologyError

    cfg = load_config(
        LLAMA, ["parallel.sequence_parallel=2", "train.micro_batch_size=4", "data.partitions=6"]
    )
    assert dp_size(cfg, 8) == 4 and global_batch(cfg, 8) == 16  # 4 replicas x micro batch 4
    assert mesh_line(cfg, 8) == "mesh dp 4 x sp 2 x tp 1 = 8 rank(s)"
    check_topology(cfg, 6)  # 3 data-parallel ranks read 2 partitions each
    with pytest.raises(TopologyError, match="the 4 data-parallel ranks"):
        check_topology(cfg, 8)
    with pytest.raises(ConfigError, match="Sizes that work: 2, 4, 8;") as exc:  # an elastic range
        load_config(
            LLAMA, ["parallel.tensor_parallel=2", "model.vocab_size=258", "cluster.workers={min: 2, max: 8}"]
        )
    why = "3 workers cannot keep the global batch (3 is not divisible by sequence_parallel x tensor_parallel = 2)"
    assert why in str(exc.value)


def test_config_validate_and_dry_runs_print_the_mesh(in_workdir, tmp_path):
    args = [LLAMA, "parallel.sequence_parallel=2", "cluster.workers=4", f"run.dir={tmp_path / 'r'}"]
    p = cli("config", "validate", *args)
    assert p.returncode == 0 and "mesh dp 2 x sp 2 x tp 1 = 4 rank(s)" in p.stdout, p.stderr
    p = cli("launch", "local", *args, "--dry-run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mesh dp 2 x sp 2 x tp 1 = 4 rank(s)" in p.stdout
    assert "global batch 16: 2 data-parallel rank(s) x micro batch 8" in p.stdout
    p = cli("launch", "local", LLAMA, "parallel.sequence_parallel=2", "cluster.workers=3", "--dry-run")
    assert p.returncode != 0 and "world size 3 is not divisible by parallel.sequence_parallel=2" in p.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------- torchrun, 2 ranks
SHARD_SCRIPT = """
import torch, torch.distributed as dist
from distrain.config import load_config
from distrain.models import build_model
from distrain.parallel import init_distributed
from distrain.parallel.sequence import SequenceParallel
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

cfg = load_config({config!r}, ["parallel.sequence_parallel=2", "train.micro_batch_size=2", "data.seq_len=16"])
info = init_distributed(cfg)
sp = SequenceParallel(cfg, build_model(cfg))
ids = torch.arange(32).reshape(2, 16)  # the batch every rank of the group reads
mine = sp.shard({{"input_ids": ids}})
batch = {{"input_ids": ids, "position_ids": torch.arange(16).expand(2, 16), "labels": ids}}
theirs = next(iter(UlyssesSPDataLoaderAdapter([batch], sp.rank, sp.group, 2, torch.device("cpu"))))
for key in ("input_ids", "position_ids", "shift_labels"):
    assert torch.equal(mine[key], theirs[key]), key
assert mine["input_ids"].shape == (2, 8) and mine["position_ids"][0, 0] == 8 * info.rank
print("shards equal on rank", info.rank)
torch.distributed.destroy_process_group()
"""


@pytest.mark.world_size
def test_the_sequence_shard_is_deepspeeds_adapters(tmp_path, workdir):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(config=LLAMA))
    p = subprocess.run(torchrun_cmd(str(script)), capture_output=True, text=True, timeout=300, cwd=workdir)
    _ok(p)
    assert p.stdout.count("shards equal on rank") == 2


def _ray(run_dir: Path, split: str, steps: int, *args: str, cwd: Path, env: dict):
    """The first leg of a split run on 2 Ray workers; the mesh line says how they split."""
    argv = ["launch", "local", LLAMA, "--workers", "2", f"run.dir={run_dir}", *COMMON, split, *args]
    p = cli(*argv, f"train.steps={steps}", env=env, cwd=cwd)
    _ok(p)
    mesh = "dp 1 x sp 2 x tp 1" if "sequence" in split else "dp 1 x sp 1 x tp 2"
    assert mesh in p.stdout + p.stderr


@pytest.fixture(scope="module")
def sp_run(workdir, tmp_path_factory, ray_env_module) -> Path:
    """sp=2 on 2 Ray workers for 3 steps, resumed on 2 torchrun ranks (the same mesh) to 6, then on
    one process (sp=1, the universal conversion) to 8; only the newest checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("mp") / "sp"
    keep = ["checkpoint.keep_last=1", "checkpoint.every_steps=2"]
    _ray(run_dir, "parallel.sequence_parallel=2", 3, *keep, cwd=workdir, env=ray_env_module)
    _ok(_train(run_dir, "parallel.sequence_parallel=2", "train.steps=6", *keep, ranks=2, cwd=workdir))
    p = _train(run_dir, "train.steps=8", *keep, cwd=workdir)
    _ok(p)
    assert "converting it to a universal checkpoint" in p.stderr
    return run_dir


@pytest.fixture(scope="module")
def tp_run(workdir, tmp_path_factory, ray_env_module) -> Path:
    """tp=2 on 2 Ray workers for 4 steps, resumed on 2 torchrun ranks (the same mesh) to 8."""
    run_dir = tmp_path_factory.mktemp("mp") / "tp"
    _ray(run_dir, "parallel.tensor_parallel=2", 4, cwd=workdir, env=ray_env_module)
    _ok(_train(run_dir, "parallel.tensor_parallel=2", "train.steps=8", ranks=2, cwd=workdir))
    return run_dir


@pytest.mark.ray
@pytest.mark.world_size
@pytest.mark.parametrize("split", ["sp_run", "tp_run"])
def test_two_ranks_split_by_sp_or_tp_train_as_one_process(request, one, split, workdir):
    """Started on Ray workers and resumed under torchrun (and, for SP, on one process): every step's
    loss, gradient norm and eval loss are the one process's."""
    run_dir = request.getfixturevalue(split)
    assert_same_training(run_dir, one, steps=8)
    summary, ref = (json.loads((d / "summary.json").read_text()) for d in (run_dir, one))
    # the tokens of a group's shared batch are counted once: as many as one process saw
    assert summary["status"] == "completed" and summary["samples_seen"] == ref["samples_seen"]
    assert summary["tokens_seen"] == ref["tokens_seen"]
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step????????"))
    assert steps == (["step00000008"] if split == "sp_run" else ["step00000004", "step00000008"])
    (log,) = sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))[-1:]  # the last attempt's
    history = [h for h in wandb_history(log) if "loss" in h]
    assert history and history[-1]["loss"] == pytest.approx(_records(one)[8]["loss"], rel=1e-4)
    st = json.loads(cli("status", run_dir, "--json", cwd=workdir).stdout)
    assert (st["state"], st["step"]) == ("completed", 8)
    # the export gathers the shards: a transformers directory with the one process's logits
    _ok(cli("export", run_dir, run_dir / "hf", "--format", "hf", cwd=workdir))
    assert (_logits(run_dir / "hf") - _logits(one / "hf")).abs().max() < 1e-4


@pytest.mark.ray
@pytest.mark.world_size
def test_a_tensor_parallel_resume_on_another_world_or_split_is_refused_before_it_starts(tp_run, workdir):
    from distrain.config import load_config
    from distrain.errors import TopologyError
    from distrain.layout import decide

    before = (tp_run / "metrics.jsonl").read_text()
    cfg = load_config(tp_run / "config.yaml", ["train.steps=10"])
    with pytest.raises(TopologyError, match="saved by 2 ranks with parallel.tensor_parallel=2"):
        decide(cfg, [4], "cluster.workers=4")
    p = _train(tp_run, "train.steps=10", ranks=2, cwd=workdir)  # tensor_parallel back to 1
    assert p.returncode != 0 and "parallel.tensor_parallel: 2 -> 1" in p.stderr
    assert (tp_run / "metrics.jsonl").read_text() == before  # nothing written


# ------------------------------------------------------------------------------- 4 ranks, dp2 x sp2
@pytest.mark.slow
@pytest.mark.world_size
def test_four_ranks_dp2_by_sp2_train_as_one_process_with_two_micro_batches(workdir, tmp_path):
    ref, run_dir = tmp_path / "one", tmp_path / "dp2sp2"
    # no eval compared: each data-parallel rank evaluates train.eval_batches of its share of the set
    args = ["train.steps=6", "train.eval_every=0"]
    _ok(_train(ref, *args, "parallel.grad_accum=2", cwd=workdir))
    p = _train(
        run_dir, *args, "parallel.sequence_parallel=2", "train.check_replicas=true", ranks=4, cwd=workdir
    )
    _ok(p)
    assert_same_training(run_dir, ref, steps=6, keys=("loss", "grad_norm"))
    assert "dp 2 x sp 2 x tp 1" in p.stdout + p.stderr
    assert json.loads((run_dir / "summary.json").read_text())["replicas_identical"] is True


# ------------------------------------------------------------------------------------------- plan
TRACE_SCRIPT = """
import json, sys, torch
from distrain.config import load_config
from distrain.models import build_model
from distrain.parallel import init_distributed
from distrain.parallel.sequence import SequenceParallel
from distrain.plan import activation_bytes

cfg = load_config({config!r}, {overrides!r})
info = init_distributed(cfg)
torch.manual_seed(0)
model = build_model(cfg)
sp = SequenceParallel(cfg, model)
params = {{p.untyped_storage().data_ptr() for p in model.parameters()}}
seen = {{}}

def pack(t):
    seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return t

batch = {{"input_ids": torch.randint(0, 700, (3, 96), generator=torch.Generator().manual_seed(1))}}
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    sp.loss({{"model": model}}, batch)
saved = sum(v for k, v in seen.items() if k not in params)
line = json.dumps({{"rank": info.rank, "saved": saved, "planned": activation_bytes(cfg)[0]}})
sys.stdout.write(line + "\\n")  # one write: the ranks print at once, into one pipe
torch.distributed.destroy_process_group()
"""

TRACE = [
    "model.d_model=96",
    "model.d_ff=320",
    "model.n_layer=3",
    "model.n_head=6",
    "model.n_kv_head=6",
    "model.vocab_size=700",
    "data.seq_len=96",
    "train.micro_batch_size=3",
    "parallel.activation_checkpointing=false",
    "parallel.precision=fp32",  # as the forward runs here
]


@pytest.mark.world_size
def test_planned_sp_activations_are_what_a_forward_on_two_ranks_saves(tmp_path, workdir):
    """Within 15 % of the bytes a sequence-parallel forward and loss save on each rank, as the
    one-process count is of one process's (``tests/test_plan.py``), and half of those."""
    from distrain.config import load_config
    from distrain.plan import activation_bytes

    script = tmp_path / "trace.py"
    script.write_text(TRACE_SCRIPT.format(config=LLAMA, overrides=[*TRACE, "parallel.sequence_parallel=2"]))
    p = subprocess.run(torchrun_cmd(str(script)), capture_output=True, text=True, timeout=300, cwd=workdir)
    _ok(p)
    ranks = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2
    whole = activation_bytes(load_config(LLAMA, TRACE))[0]
    for r in ranks:
        assert r["planned"] == pytest.approx(r["saved"], rel=0.15), r
        assert r["planned"] == pytest.approx(whole / 2)


def test_the_plan_divides_tp_split_states_by_tp_and_counts_the_all_to_all_buffers():
    from distrain.config import load_config
    from distrain.models.gpt import matmul_params
    from distrain.plan import plan

    base = ["model.vocab_size=258", "cluster.workers=4", "parallel.zero_stage=1"]
    one, tp = (plan(load_config(LLAMA, [*base, *extra])) for extra in ([], ["parallel.tensor_parallel=2"]))
    split = matmul_params(load_config(LLAMA, base))
    whole = one["params"] - split
    assert tp["per_gpu_bytes"]["weights"] == pytest.approx(2 * (split // 2 + whole))  # bf16 weights
    # ZeRO 1 partitions Adam's moments over the 2 data-parallel ranks of each tensor-parallel rank
    assert tp["per_gpu_bytes"]["optimizer"] == pytest.approx(8 * (split // 2 + whole) / 2)
    assert tp["per_gpu_bytes"]["activations"] < one["per_gpu_bytes"]["activations"]
    assert one["per_gpu_bytes"]["all_to_all"] == tp["per_gpu_bytes"]["all_to_all"] == 0
    sp = plan(load_config(LLAMA, [*base, "parallel.sequence_parallel=2"]))
    assert sp["per_gpu_bytes"]["activations"] == pytest.approx(one["per_gpu_bytes"]["activations"] / 2)
    assert sp["per_gpu_bytes"]["all_to_all"] > 0 and sp["mesh"] == "mesh dp 2 x sp 2 x tp 1 = 4 rank(s)"


def test_the_plan_says_which_mesh_fits_a_1b_llama_at_32k_tokens_on_8_h100s():
    from distrain.config import load_config
    from distrain.plan import format_plan, plan

    p = plan(load_config(CONFIGS / "llama-1b-32k-sp.yaml"), 8, "H100")
    fits = {(m["sp"], m["tp"]): m["total_bytes"] <= 80e9 for m in p["meshes"]}
    assert fits[(1, 1)] is False and fits[(2, 1)] and fits[(4, 1)]  # one sequence a GPU does not fit
    assert p["fits"] and p["mesh"] == "mesh dp 2 x sp 4 x tp 1 = 8 rank(s)"
    assert "dp 8 x sp 1 x tp 1 (ZeRO 3)" in format_plan(p) and "does not fit" in format_plan(p)
    no_sp = plan(
        load_config(
            CONFIGS / "llama-1b-32k-sp.yaml", ["parallel.sequence_parallel=1", "parallel.grad_accum=1"]
        ),
        8,
    )
    assert not no_sp["fits"] and no_sp["fix"].startswith("parallel.")
