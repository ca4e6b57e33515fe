"""Shared test set-up: everything offline and on loopback, a persistent DeepSpeed op cache, and the
tiny data sets written once per session into a temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    RAY_USAGE_STATS_ENABLED="0",
    TOKENIZERS_PARALLELISM="false",
)
# data manifests are cached per test session, not in the user's ~/.cache
os.environ.setdefault("DISTRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="distrain-manifests-"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # benchmarks/gpu_check.sh sets cuda for the gpu tests
# DeepSpeed JIT-compiles a CPU op on first use (~30-50 s); keep it across sessions and CI runs
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "distrain" / "torch_extensions"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A working directory holding data/ as `distrain data prepare` writes it."""
    from distrain.data.prepare import prepare

    wd = tmp_path_factory.mktemp("work")
    prepare(wd / "data")
    return wd


@pytest.fixture
def in_workdir(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    return workdir


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def wait_for_records(path: Path, n: int, proc, timeout: float = 300) -> None:
    """Wait until the run writing ``path`` (metrics.jsonl) has logged ``n`` records; fail with the
    process's stderr if it exits first."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < n):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    assert path.exists() and len(path.read_text().splitlines()) >= n, (
        f"{path}: fewer than {n} records after {timeout}s"
    )


def complete_steps(path: Path) -> list[int]:
    """The steps of the records a running process has finished writing to ``path`` (metrics.jsonl;
    a line being written is left out)."""
    import json

    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(ln)["step"] for ln in lines if ln.endswith("\n") and ln.strip()]


def read_wandb(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``), decoded with wandb's own protobuf
    schema. The file is a LevelDB-style log: a 7-byte W&B header, then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def wandb_history(path: Path) -> list[dict]:
    """The logged rows (``run.log``) of a W&B transaction log, values decoded from JSON."""
    import json

    rows = []
    for rec in read_wandb(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            )
    return rows


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` (loopback)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_cmd(*argv: str, ranks: int = 2) -> list[str]:
    """torchrun with ``ranks`` local ranks on a free loopback port, running ``argv`` (a script and
    its arguments, or ``-m module ...``)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, argv),
    ]  # fmt: skip


def cli_cmd(*args, ranks: int = 1) -> list[str]:
    """The command line of ``distrain ARGS``: one process, or ``ranks`` > 1 under torchrun (each
    rank runs the CLI; the args say ``cluster.workers``)."""
    argv = ["-m", "distrain.cli", *map(str, args)]
    return torchrun_cmd(*argv, ranks=ranks) if ranks > 1 else [sys.executable, *argv]


def cli(
    *args, env: dict | None = None, timeout: float = 600, cwd=None, check: bool = False, ranks: int = 1
) -> subprocess.CompletedProcess:
    """``distrain ARGS`` as a user runs it, in this test's working directory (or ``cwd``), on one
    process or (``ranks`` > 1) under torchrun. The one way the tests run the CLI to its end; a run a
    test signals or kills is started with ``subprocess.Popen(cli_cmd(...))``. ``check``: assert it
    exited 0, with the tail of its output."""
    p = subprocess.run(
        cli_cmd(*args, ranks=ranks), capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    if check:
        assert p.returncode == 0, (p.stdout[-3000:] + p.stderr[-5000:]) or f"exit {p.returncode}"
    return p


def cli_all(
    *calls, env: dict | None = None, timeout: float = 600, cwd=None
) -> list[subprocess.CompletedProcess]:
    """Several ``distrain`` commands that do not depend on one another, started at once (each is
    mostly single-threaded start-up, which overlaps on the cores); one call is a tuple of args, the
    results come in the same order."""
    procs = [
        subprocess.Popen(
            cli_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        for args in calls
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [
            subprocess.CompletedProcess(p.args, p.returncode, *out)
            for p, out in zip(procs, outs, strict=True)
        ]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def write_corpus(root: Path, files: int = 4, rows: int = 16, bad: tuple[int, int] | None = None) -> str:
    """A jsonl corpus of ``files`` small files of ``rows`` documents (about two 128-token samples
    each); ``bad`` = (file, row): that row is malformed JSON. Returns its glob."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(root / f"train-{f:05d}.jsonl", "w") as fh:
            for r in range(rows):
                if bad == (f, r):
                    fh.write("{not json\n")
                else:
                    fh.write(json.dumps({"text": f"file {f} row {r}: " * 16}) + "\n")
    return str(root / "train-*.jsonl")


def _ray_env(state_dir: Path):
    """A subprocess environment that keeps Ray on loopback with its files in a temp dir (a short
    path: Ray's unix sockets live there and may not exceed 107 bytes)."""
    import shutil

    from distrain.cluster.ray import loopback_env

    tmp = Path(tempfile.mkdtemp(prefix="dr-", dir="/tmp"))
    env = {
        **os.environ,
        **loopback_env("127.0.0.2"),  # proxies at a closed port: cloud-metadata probes fail at once
        "RAY_TMPDIR": str(tmp),
        "TMPDIR": str(tmp),
        "RAY_STATE_DIR": str(state_dir),
        "RAY_DEDUP_LOGS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def ray_env(tmp_path) -> dict[str, str]:
    """Ray's loopback environment for one test."""
    yield from _ray_env(tmp_path / "nodes")


@pytest.fixture(scope="module")
def ray_env_module(tmp_path_factory) -> dict[str, str]:
    """The same, for a module-scoped fixture's run."""
    yield from _ray_env(tmp_path_factory.mktemp("nodes"))
