"""Throughput, MFU and energy accounting: the arithmetic at the counter boundary, one reader per node,
totals across resume, the report and the documented keys."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distrain.config import load_config
from distrain.metrics.energy import CpuEstimate, NvmlReader, RaplReader, co2e_kg
from distrain.metrics.peak import gpu_peak_flops
from distrain.train import run
from tests.conftest import CONFIGS, REPO, read_jsonl


# ------------------------------------------------------------------- counters at the boundary
def _rapl_tree(root: Path, packages: dict[str, int], wrap: int = 1_000_000) -> None:
    for name, uj in packages.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")


def test_rapl_reader_sums_packages_skips_subdomains_and_handles_wraparound(tmp_path):
    _rapl_tree(tmp_path, {"intel-rapl:0": 900_000, "intel-rapl:1": 10_000, "intel-rapl:0:0": 5})
    reader = RaplReader(tmp_path)
    assert len(reader.domains) == 2  # the core sub-domain lies inside package 0: not counted again
    _rapl_tree(tmp_path, {"intel-rapl:0": 950_000, "intel-rapl:1": 30_000, "intel-rapl:0:0": 999})
    assert reader.read() == pytest.approx(0.05 + 0.02)
    # package 0 wraps at 1e6 uJ: 950_000 -> 1_000_000 -> 100_000 is 150_000 uJ
    _rapl_tree(tmp_path, {"intel-rapl:0": 100_000, "intel-rapl:1": 30_000})
    assert reader.read() == pytest.approx(0.07 + 0.15)


def test_unreadable_rapl_is_not_available(tmp_path):
    assert not RaplReader(tmp_path / "nothing").available
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text("not a number")
    (d / "max_energy_range_uj").write_text("100")
    assert not RaplReader(tmp_path).available


class FakeNvml:
    """pynvml's surface: device 'GPU-a' has the energy counter (mJ), 'GPU-b' only reports power."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.energy_mj = {"GPU-a": 5_000_000}
        self.power_mw = {"GPU-b": 200_000}
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h not in self.energy_mj:
            raise self.NVMLError("Not Supported")
        return self.energy_mj[h]

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw[h]


def test_nvml_reader_uses_the_energy_counter_and_samples_power_where_it_is_missing():
    nvml = FakeNvml()
    t0 = time.monotonic()
    reader = NvmlReader(["GPU-a", "GPU-b"], nvml=nvml, sample_s=0.01)
    t1 = time.monotonic()
    assert reader.kind == "nvml+nvml_power"
    nvml.energy_mj["GPU-a"] += 1500  # 1.5 J on the counter
    time.sleep(0.3)
    t2 = time.monotonic()
    joules = reader.read()
    t3 = time.monotonic()
    # GPU-b at a steady 200 W for the time between opening and reading, integrated from samples
    assert 1.5 + 200 * (t2 - t1) <= joules + 1e-6 and joules <= 1.5 + 200 * (t3 - t0) + 1e-6
    reader.close()
    assert nvml.shut


def test_cpu_estimate_is_watts_times_utilisation(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    t0 = time.monotonic()
    est = CpuEstimate(40.0, stat)
    t1 = time.monotonic()
    time.sleep(0.2)
    # 300 more busy ticks and 100 more idle: 75 % busy
    stat.write_text("cpu  300 0 200 880 20 0 0 0 0 0\n")
    t2 = time.monotonic()
    j = est.read()
    t3 = time.monotonic()
    assert est.estimated and 40 * 0.75 * (t2 - t1) <= j <= 40 * 0.75 * (t3 - t0)


def test_co2_is_kwh_times_pue_times_grid_intensity():
    assert co2e_kg(3.6e6, grid_g_per_kwh=400, pue=1.5) == pytest.approx(0.6)
    assert co2e_kg(0.0, 400, 1.2) == 0.0


def test_peak_table_knows_cards_and_refuses_to_guess_the_rest():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16")[0] == pytest.approx(756.5e12)
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "tf32")[0] == pytest.approx(156e12)
    assert gpu_peak_flops("NVIDIA H200", "fp32")[0] == pytest.approx(67e12)
    peak, why = gpu_peak_flops("NVIDIA GeForce GTX 1080", "fp32")
    assert peak is None and "not in the peak-FLOPs table" in why
    assert gpu_peak_flops("Tesla V100-SXM2-32GB", "bf16")[0] is None  # no bf16 on Volta


# ------------------------------------------------------------------------------ in a run
def _train(tmp_path, *overrides, steps=8, name="run"):
    run_dir = tmp_path / name
    cfg = load_config(
        CONFIGS / "gpt-cpu-tiny.yaml",
        [
            f"run.dir={run_dir}",
            f"train.steps={steps}",
            "train.log_every=2",
            "checkpoint.at_end=false",
            *overrides,
        ],
    )
    return run(cfg), read_jsonl(run_dir / "metrics.jsonl"), run_dir


def test_records_carry_split_mfu_and_energy(in_workdir, tmp_path):
    summary, records, _ = _train(tmp_path, "train.eval_every=4")
    recs = [r for r in records if "loss" in r]
    for r in recs:
        assert r["step_time_s"] > 0 and r["fwd_bwd_s"] > 0 and r["optim_s"] > 0
        split = r["data_wait_s"] + r["fwd_bwd_s"] + r["optim_s"]
        assert split <= r["step_time_s"] * 1.001  # the phases lie inside the step
        assert 0 < r["mfu"] < 1 and r["hfu"] == r["mfu"]  # no activation checkpointing: HFU = MFU
        assert r["tflops_per_device"] * 1e12 == pytest.approx(
            r["samples_per_s_per_device"] * summary["flops"] / summary["samples_seen"]
        )
        assert r["energy_source"] in ("estimated", "rapl") and r["power_w"] > 0
    assert [r["eval_s"] > 0 for r in recs] == [False, True, False, True]  # eval time shows where it ran
    energy = [r["energy_j"] for r in recs]
    assert energy == sorted(energy) and energy[-1] <= summary["energy_j"]
    assert summary["j_per_token"] == pytest.approx(summary["energy_j"] / summary["tokens_seen"])
    assert summary["co2e_kg"] == pytest.approx(summary["energy_j"] / 3.6e6 * 475 / 1000)
    assert summary["flops"] == pytest.approx(8 * 8 * recs[0]["flops_total"] / (2 * 8))


def test_configured_peak_gives_mfu_and_hfu_counts_recomputation(in_workdir, tmp_path):
    _, records, _ = _train(
        tmp_path, "metrics.peak_tflops=2.0", "parallel.activation_checkpointing=true", "metrics.energy=false"
    )
    for r in (r for r in records if "loss" in r):
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 2.0)
        assert r["hfu"] == pytest.approx(r["mfu"] * 4 / 3)
        assert "energy_j" not in r


def test_accounting_off_keeps_rates_only(in_workdir, tmp_path):
    summary, records, _ = _train(tmp_path, "metrics.accounting=false")
    r = records[-1]
    assert r["samples_per_s"] > 0 and "data_wait_pct" in r
    assert not {"mfu", "energy_j", "fwd_bwd_s", "power_w"} & set(r)
    assert summary["mean_mfu"] is None and "energy_j" not in summary


def test_totals_survive_resume(in_workdir, tmp_path):
    first, recs1, run_dir = _train(tmp_path, "checkpoint.at_end=true", steps=4)
    second, recs2, _ = _train(tmp_path, "checkpoint.at_end=true", "checkpoint.resume=true", steps=8)
    per_step = first["samples_seen"] / 4
    assert second["samples_seen"] == 8 * per_step and second["tokens_seen"] == 8 * per_step * 128
    assert second["flops"] == pytest.approx(2 * first["flops"])
    assert second["energy_j"] > first["energy_j"] and second["elapsed_s"] > first["elapsed_s"]
    energy = [r["energy_j"] for r in recs2 if "energy_j" in r]
    assert [r["step"] for r in recs2 if "loss" in r] == [2, 4, 6, 8]  # one file, continued
    assert energy == sorted(energy) and energy[2] > first["energy_j"] * 0.999


def test_report_writes_plots_and_summary(in_workdir, tmp_path):
    from PIL import Image

    summary, _, run_dir = _train(tmp_path, "train.eval_every=4")
    p = subprocess.run(
        [sys.executable, "-m", "distrain.cli", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = run_dir / "report"
    for png in ("loss.png", "throughput.png", "mfu.png", "power.png", "energy.png"):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG"
    md = (out / "report.md").read_text()
    assert "| steps | 8/8 |" in md and f"{summary['tokens_seen']:,}" in md and "(estimated)" in md
    bad = subprocess.run(
        [sys.executable, "-m", "distrain.cli", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "metrics.jsonl does not exist" in bad.stderr


def test_readme_documents_every_metrics_key(in_workdir, tmp_path):
    _, records, _ = _train(tmp_path, "train.eval_every=4")
    keys = set().union(*records)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("`metrics.jsonl` keys") : readme.index("## Tests")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    assert keys <= documented, keys - documented


# ------------------------------------------------------------------------- one reader per node
@pytest.mark.world_size
def test_two_ranks_on_one_node_count_the_node_once(in_workdir, tmp_path):
    """A scripted RAPL counter rises at 50 W; two ranks on this node must report ~50 W, not 100."""
    root = tmp_path / "powercap"
    _rapl_tree(root, {"intel-rapl:0": 0}, wrap=2**62)
    stop = threading.Event()

    def drive():
        t0 = time.monotonic()
        while not stop.is_set():
            tmp = root / "intel-rapl:0" / "energy_uj.tmp"
            tmp.write_text(str(int((time.monotonic() - t0) * 50 * 1e6)))
            os.replace(tmp, root / "intel-rapl:0" / "energy_uj")
            time.sleep(0.002)

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    run_dir = tmp_path / "r"
    from tests.test_multiprocess import _torchrun

    try:
        p = _torchrun(
            "train",
            str(CONFIGS / "gpt-cpu-tiny.yaml"),
            f"run.dir={run_dir}",
            "train.steps=40",
            "train.log_every=10",
            "checkpoint.at_end=false",
            env={**os.environ, "DISTRAIN_POWERCAP_ROOT": str(root)},
        )
    finally:
        stop.set()
        th.join()
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["energy_source"] == "rapl" and r["energy_estimated"] is False for r in recs)
    powers = sorted(r["power_w"] for r in recs)
    assert 35 < powers[len(powers) // 2] < 65, powers  # twice the node's power would be ~100 W
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["energy_j"] == pytest.approx(50 * summary["elapsed_s"], rel=0.3)
