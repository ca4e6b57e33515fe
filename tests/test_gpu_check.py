"""benchmarks/gpu_check.sh runs in one shot on a lent GPU machine, so its CPU parts are proven here
first: the dry run collects every gpu test, runs each benchmark loop on tiny shapes on the CPU and
writes the table into a copy of RESULTS.md."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # about 100 s: every benchmark loop on the CPU; run before a GPU check (-m slow)
def test_gpu_check_dry_run_writes_the_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "RESULTS": str(results), "PY": sys.executable}
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "16 tests collected" in p.stdout, p.stdout[-3000:]  # every test of tests/test_gpu.py
    text = results.read_text()
    assert "## GPU check" in text and "### CPU (dry run)" in text
    for row in (
        "| llama plain |",
        "| llama distrain ZeRO 0 |",
        "| llama distrain ZeRO 3 |",
        "| resnet plain |",
        "| resnet distrain ZeRO 0 |",
        "| gan plain |",
        "| gan distrain ZeRO 1 |",
        "| vae plain |",
        "| vae distrain ZeRO 2 |",
        "| distrain (DeepSpeed shards, manifest, sha256) |",
        "| torch.save / torch.load |",
        "| longest that fits at sp 1 | 128 |",  # the dry run's tiny shape fits every length tried
    ):
        line = next((x for x in text.splitlines() if x.startswith(row)), None)
        assert line is not None, f"{row} missing from:\n{text}"
        assert "nan" not in line
    # each distrain row is its rate against the plain loop of the same model measured in the same
    # run: a ratio the printed rates reproduce (they are rounded to whole units), and a sane one
    for row, plain_row in (
        ("llama distrain ZeRO 0", "llama plain"),
        ("llama distrain ZeRO 3", "llama plain"),
        ("resnet distrain ZeRO 0", "resnet plain"),
        ("gan distrain ZeRO 1", "gan plain"),
        ("vae distrain ZeRO 2", "vae plain"),
    ):
        rate, ratio = _rate_and_ratio(text, row)
        plain, _ = _rate_and_ratio(text, plain_row)
        assert 0 < ratio < 10, (row, ratio)
        assert rate >= 1 and plain >= 1, (row, rate, plain)
        low, high = (rate - 0.5) / (plain + 0.5), (rate + 0.5) / (plain - 0.5)
        assert low - 0.0005 <= ratio <= high + 0.0005, (row, rate, plain, ratio)


def _rate_and_ratio(text: str, row: str) -> tuple[float, float]:
    """The rate (column 2, e.g. '1,234 tok/s') and the ratio to the plain loop (column 3, '0.953x')
    of a row of bench_gpu.py's table."""
    line = next(x for x in text.splitlines() if x.startswith(f"| {row} |"))
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    assert cells[0] == row and cells[2].endswith("x"), line
    return float(cells[1].split()[0].replace(",", "")), float(cells[2].removesuffix("x"))


def test_gpu_wheels_dry_run_names_every_missing_package(tmp_path):
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_wheels.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1", "PY": sys.executable, "WHEELS": str(tmp_path / "w")},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    for name in ("pydantic==", "pydantic-core==", "hjson==", "deepspeed=="):
        assert name in p.stdout, p.stdout
    assert "--python-version 3.12" in p.stdout
