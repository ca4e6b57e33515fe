"""How the parts are joined: a model is one file plus a registry line (here: defined in this test),
the config builds nothing and imports no torch, user errors print one line and everything else its
traceback, and a non-finite step updates nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field

from distrain import models
from distrain.config import ConfigError, ModelSection, load_config
from distrain.train import run, setup
from tests.conftest import CONFIGS, REPO, read_jsonl


# ------------------------------------------------------------------ a model defined in this test
class BagLMConfig(ModelSection):
    """A next-token model over a window of previous tokens (embedding bag + linear head)."""

    name: Literal["baglm"] = Field("baglm", description="The test's own model.")
    vocab_size: int = Field(257, ge=2, description="Vocabulary size.")
    d: int = Field(32, ge=1, description="Embedding size.")

    def check(self, cfg) -> None:
        if cfg.data.seq_len % 8:
            raise ValueError("data.seq_len must be a multiple of 8 for model.name=baglm")


class BagLM(torch.nn.Module):
    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.cumsum(self.embed(ids), dim=1) / torch.arange(1, ids.size(1) + 1).view(1, -1, 1)
        return self.head(h)


POISON: set[int] = set()  # training forward calls (1-based) whose loss is made NaN
CALLS = [0]


def _loss(model, batch):
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    if model.training:
        CALLS[0] += 1
        if CALLS[0] in POISON:
            loss = loss * float("nan")
    return loss


SPEC = models.ModelSpec(
    name="baglm",
    config=BagLMConfig,
    build=lambda cfg: BagLM(cfg.model.vocab_size, cfg.model.d),
    loss=_loss,
    flops_per_sample=lambda cfg: 6.0 * (cfg.model.vocab_size * cfg.model.d) * cfg.data.seq_len,
)
models.register(SPEC)

BAG = ["data.eval_path=", "train.eval_every=0", "train.log_every=1", "checkpoint.at_end=false"]


def _yaml(tmp_path) -> Path:
    """gpt-cpu-tiny's data and schedule with the baglm model."""
    raw = yaml.safe_load((CONFIGS / "gpt-cpu-tiny.yaml").read_text())
    raw["model"] = {"name": "baglm", "d": 32}
    raw["optim"]["warmup_steps"] = 0
    path = tmp_path / "baglm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cfg(tmp_path, *overrides, name="r"):
    return load_config(_yaml(tmp_path), [f"run.dir={tmp_path / name}", *BAG, *overrides])


def test_a_model_registered_in_the_test_trains(in_workdir, tmp_path):
    cfg = _cfg(tmp_path, "train.steps=30", "optim.lr=1e-2")
    assert type(cfg.model) is BagLMConfig and cfg.model.d == 32
    summary = run(cfg)
    losses = [r["loss"] for r in read_jsonl(cfg.run.run_dir / "metrics.jsonl") if "loss" in r]
    assert summary["status"] == "completed" and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    with pytest.raises(ConfigError, match=r"data.seq_len must be a multiple of 8 for model.name=baglm"):
        _cfg(tmp_path, "data.seq_len=100")  # the model's own rule, on its config class


def test_config_validate_imports_no_torch():
    code = textwrap.dedent(
        f"""
        import sys, glob
        import distrain.config
        assert not any(m.startswith("distrain.models.") for m in sys.modules), "config imported a model"
        from distrain.cli import main
        for path in sorted(glob.glob({str(CONFIGS / "*.yaml")!r})):
            assert main(["config", "validate", path]) == 0, path
        print("torch" in sys.modules, sorted(m for m in sys.modules if m.startswith("distrain")))
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    loaded_torch, modules = p.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded_torch == "False", modules
    assert p.stdout.count(": valid") == len(list(CONFIGS.glob("*.yaml")))


def _cli(tmp_path, *args, bug: str = ""):
    """`distrain` in a subprocess, with the baglm model registered (and ``bug`` run in its forward)."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import tests.test_structure as t
        original = t.BagLM.forward
        def forward(self, ids):
            {bug or "pass"}
            return original(self, ids)
        t.BagLM.forward = forward
        from distrain.cli import main
        sys.exit(main({list(args)!r}))
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_user_errors_are_one_line_and_other_errors_keep_their_traceback(in_workdir, tmp_path):
    common = [f"run.dir={tmp_path / 'r'}", *BAG, "train.steps=2"]
    p = _cli(tmp_path, "train", str(_yaml(tmp_path)), *common, "data.train_path=none/*.jsonl")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("distrain: error: data.train_path: no data files")
    p = _cli(
        tmp_path,
        "train",
        str(_yaml(tmp_path)),
        *common,
        bug="raise RuntimeError('CUDA error: an illegal memory access was encountered')",
    )
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr and "in forward" in p.stderr, p.stderr[-3000:]
    assert "RuntimeError: CUDA error: an illegal memory access" in p.stderr


# ------------------------------------------------------------------------------ non-finite steps
NONFINITE_CASES = {  # who detects the step: distrain on the device, on the host, or DeepSpeed
    "zero0-fused": [],
    "zero0-unfused": ["optim.fused=false"],
    "zero2": ["parallel.zero_stage=2"],
    "zero0-bf16": ["parallel.precision=bf16"],
}


def _state(session) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights and every optimizer-state tensor (DeepSpeed's flat partitions under ZeRO)."""
    eng = session.engine
    weights = [p.detach().float().clone() for p in eng.module.parameters()]
    states = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            states.append(obj.detach().float().clone())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k])
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    inner = getattr(eng.optimizer, "optimizer", eng.optimizer)  # DeepSpeed wraps torch's
    walk(inner.state_dict()["state"])
    return weights, states


@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_a_nonfinite_step_leaves_weights_and_optimizer_untouched(in_workdir, tmp_path, case):
    common = ["optim.schedule=constant", "train.on_nonfinite=skip", *NONFINITE_CASES[case]]
    POISON.clear()
    CALLS[0] = 0
    ref = setup(_cfg(tmp_path, "train.steps=5", *common, name="ref"))
    run(ref.cfg, ref)
    POISON.update({6})
    CALLS[0] = 0
    bad = setup(_cfg(tmp_path, "train.steps=6", *common, name="bad"))
    summary = run(bad.cfg, bad)
    POISON.clear()
    (w_ref, s_ref), (w_bad, s_bad) = _state(ref), _state(bad)
    assert len(s_ref) == len(s_bad) > 0
    assert all(torch.equal(a, b) for a, b in zip(w_ref, w_bad, strict=True)), "step 6 changed the weights"
    assert all(torch.equal(a, b) for a, b in zip(s_ref, s_bad, strict=True)), "step 6 changed the optimizer"
    recs = read_jsonl(bad.cfg.run.run_dir / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in recs] == [0, 0, 0, 0, 0, 1]
    assert recs[-1]["loss"] is None and all(r["loss"] > 0 for r in recs[:-1])
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 1


@pytest.mark.parametrize("case", ["zero0-fused", "zero2"])
def test_consecutive_nonfinite_steps_stop_the_run_naming_step_and_rank(in_workdir, tmp_path, case):
    from distrain.trainer import NonFiniteError

    POISON.clear()
    POISON.update({4, 5, 6})
    CALLS[0] = 0
    cfg = _cfg(tmp_path, "train.steps=20", "train.max_nonfinite_steps=3", *NONFINITE_CASES[case])
    try:
        with pytest.raises(
            NonFiniteError, match=r"3 consecutive steps up to step 6 .*non-finite loss on rank\(s\) \[0\]"
        ):
            run(cfg)
    finally:
        POISON.clear()
    recs = read_jsonl(cfg.run.run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]  # the run ended at step 6's record
    assert recs[-1]["nonfinite_steps"] == 2
    POISON.update({4, 6})  # not consecutive: skipped and counted, the run goes on
    CALLS[0] = 0
    try:
        summary = run(_cfg(tmp_path, "train.steps=8", *NONFINITE_CASES[case], name="gaps"))
    finally:
        POISON.clear()
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 2


def test_a_ray_launch_that_changes_the_model_is_refused_before_ray_starts(in_workdir, tmp_path):
    from distrain.cluster.ray import launch

    run(_cfg(tmp_path, "train.steps=2", "checkpoint.at_end=true"))
    run_dir = tmp_path / "r"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    other = _cfg(tmp_path, "train.steps=4", "model.d=16")
    with pytest.raises(ConfigError, match=r"a resume may not change: model.d: 32 -> 16"):
        launch(other, local=True)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no RUN_DIR/ray
    import ray

    assert not ray.is_initialized()


# ------------------------------------------------------------------------------ import layering
PACKAGE = REPO / "distrain"
LAYERS = ("cli", "cluster", "train", "trainer")  # from the top; every other module is a part, below them


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The distrain modules ``path`` imports, at import time or inside functions (what an ``if
    TYPE_CHECKING:`` block imports is for type checkers only)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "distrain"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distrain":
            # `from distrain import models` imports distrain.models; `from distrain.x import f`, distrain.x
            found |= (
                {f"distrain.{a.name}" for a in node.names} if node.module == "distrain" else {node.module}
            )
    return {m for m in found if (PACKAGE.parent / (m.replace(".", "/") + ".py")).exists()} | {
        m for m in found if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()
    }


def _layer(module: str) -> int:
    """0 for cli, 1 for cluster, 2 for train, 3 for trainer, 4 for a part (config, models, data, parallel,
    metrics, checkpoint, tracking, status, layout, plan, export, samples, ...)."""
    top = module.split(".")[1] if "." in module else ""
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_point_down_the_layers():
    """cli -> cluster -> train -> trainer -> parts: no module imports one of a higher layer."""
    up = [
        f"{m} imports {n}"
        for m, targets in _graph().items()
        for n in sorted(targets)
        if _layer(n) < _layer(m)
    ]
    assert not up, "imports against the layering cli -> cluster -> train -> trainer -> parts:\n" + "\n".join(
        up
    )


def test_config_and_model_registry_do_not_import_each_other():
    graph = _graph()
    config = {m: t for m, t in graph.items() if m == "distrain.config" or m.startswith("distrain.config.")}
    assert config and all(config.values())
    into_models = [
        f"{m} imports {n}" for m, t in config.items() for n in sorted(t) if n.startswith("distrain.models")
    ]
    assert not into_models, "the config imports model modules:\n" + "\n".join(into_models)
    assert (
        "distrain.config.schema" in graph["distrain.models.gpt"]
    )  # a model's config class is a ModelSection
    into_config = sorted(n for n in graph["distrain.models"] if n.startswith("distrain.config"))
    assert not into_config, f"the model registry imports {into_config}"
    code = "import sys, distrain.config; print(sorted(m for m in sys.modules if m.startswith('distrain.models')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"import distrain.config loaded {p.stdout.strip()}"


# ------------------------------------------------------------------------------ function length
MAX_LINES = 60
LONG_NOTE = "# long:"  # on a def line: why this function is longer than MAX_LINES


def test_no_function_is_over_60_lines_without_a_note():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and LONG_NOTE not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, (
        f"functions over {MAX_LINES} lines (split them, or say why on the def line: `{LONG_NOTE} <reason>`):\n"
        + "\n".join(long)
    )
