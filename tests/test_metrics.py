"""Throughput, MFU and energy accounting: the arithmetic at the counter boundary, one reader per node,
totals across resume, the report and the documented keys."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import distrain.metrics.energy as energy_mod
import distrain.metrics.throughput as throughput_mod
from distrain.config import load_config
from distrain.metrics import Meters
from distrain.metrics.energy import CpuEstimate, EnergyMeter, NvmlReader, RaplReader, co2e_kg
from distrain.metrics.peak import find_peak, gpu_peak_flops
from distrain.metrics.throughput import Throughput
from distrain.parallel import DistInfo, HostComm
from distrain.train import run
from tests.conftest import CONFIGS, REPO, cli, read_jsonl


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


# --------------------------------------------------------------------- the meters, one by one
class Clock:
    """A perf_counter that moves only when told."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def perf_counter(self) -> float:
        return self.t


class FakeComm:
    """HostComm's surface for ``nodes`` alike nodes: sum multiplies, gather answers ``gathered``."""

    def __init__(self, nodes: int = 1, gathered: list | None = None, mean: float = 0.0):
        self.nodes, self.gathered, self.mean_value, self.calls = nodes, gathered, mean, []

    def sum(self, t):
        self.calls.append("sum")
        return t * self.nodes

    def gather(self, obj):
        self.calls.append("gather")
        return self.gathered if self.gathered is not None else [obj]

    def mean(self, t):
        self.calls.append("mean")
        return self.mean_value

    def barrier(self):
        self.calls.append("barrier")


def _info(comm, rank: int = 0, world: int = 1) -> DistInfo:
    return DistInfo(
        rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"), backend="gloo", comm=comm
    )


def test_throughput_rates_count_training_time_and_mfu_is_time_weighted(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(throughput_mod, "time", clock)
    tp = Throughput(8, 128, 1e9, world_size=2, hfu_factor=4 / 3)
    tp.start(peak=1e10)
    for _ in range(2):  # per step: 0.5 s data, 1.5 s fwd_bwd, 0.5 s optim
        tp.mark()
        for phase, dt in (("data", 0.5), ("fwd_bwd", 1.5), ("optim", 0.5)):
            clock.t += dt
            tp.lap(phase)
        tp.step_done()
    tp.mark()
    clock.t += 1.0
    tp.lap("eval")  # 1 s of eval: not training time
    tp.flush()
    rec, wall = tp.window_keys()
    assert wall == pytest.approx(6.0)
    assert rec["samples_per_s"] == pytest.approx(16 / 5.0) and rec[
        "samples_per_s_per_device"
    ] == pytest.approx(1.6)
    assert rec["tokens_per_s"] == pytest.approx(16 * 128 / 5.0)
    assert rec["step_time_s"] == pytest.approx(2.5) and rec["eval_s"] == pytest.approx(0.5)
    assert rec["data_wait_s"] == pytest.approx(0.5) and rec["data_wait_pct"] == pytest.approx(20.0)
    assert rec["tflops_per_device"] == pytest.approx(2 * 8e9 / 5.0 / 2 / 1e12)
    assert rec["mfu"] == pytest.approx(0.16) and rec["hfu"] == pytest.approx(0.16 * 4 / 3)
    assert tp.total_keys() == {"samples_total": 16, "tokens_total": 2048, "flops_total": 16e9}
    tp.reset_window()
    tp.mark()  # a second window: 1 step in 10 s, at a quarter of the MFU
    clock.t += 10.0
    tp.lap("fwd_bwd")
    tp.step_done()
    rec2, _ = tp.window_keys()
    assert rec2["mfu"] == pytest.approx(0.04)
    tp.flush()
    s = tp.summary()
    assert s["mean_mfu"] == pytest.approx((0.16 * 5.0 + 0.04 * 10.0) / 15.0)  # time-weighted
    assert s["elapsed_s"] == pytest.approx(16.0) and s["data_wait_pct"] == pytest.approx(100 * 1.0 / 16.0)


def test_throughput_elapsed_continues_a_resumed_run_and_accounting_off_keeps_rates(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(throughput_mod, "time", clock)
    tp = Throughput(4, None, 1e6, world_size=1, accounting=False)
    tp.load_state_dict({"samples": 40, "elapsed_s": 30.0})  # an older checkpoint: other keys missing
    assert tp.totals["flops"] == 0.0 and tp.totals["samples"] == 40
    tp.start()
    clock.t += 2.0
    tp.step_done()
    assert tp.elapsed() == pytest.approx(32.0)
    tp.flush()
    rec, _ = tp.window_keys()
    assert "tokens_per_s" not in rec and not {"mfu", "step_time_s", "fwd_bwd_s"} & set(rec)
    assert rec["elapsed_s"] == pytest.approx(32.0) and tp.total_keys() == {
        "samples_total": 44,
        "flops_total": 4e6,
    }


class FakeNode:
    def __init__(self, source="rapl", estimated=False, step_j=10.0):
        self.source, self.estimated, self.step_j, self.j, self.closed = source, estimated, step_j, 0.0, False

    def read(self):
        self.j += self.step_j
        return self.j

    def close(self):
        self.closed = True


def _energy_cfg(**kw):
    return load_config(CONFIGS / "gpt-cpu-tiny.yaml", [f"metrics.{k}={v}" for k, v in kw.items()]).metrics


def test_energy_meter_opens_one_reader_per_host_and_labels_the_job(monkeypatch):
    opened = []
    monkeypatch.setattr(
        energy_mod, "open_node_energy", lambda uuids, watts, s: opened.append((uuids, watts)) or FakeNode()
    )
    workers = [
        {"rank": 0, "host": "a", "gpu": "GPU-1"},
        {"rank": 1, "host": "a", "gpu": "GPU-0"},
        {"rank": 2, "host": "b", "gpu": None},
    ]
    labels = [["nvml+rapl", False], [None, False], ["estimated", True]]
    lowest, other = (
        EnergyMeter(_energy_cfg(cpu_watts=20), _info(FakeComm(gathered=labels), r)) for r in (0, 1)
    )
    lowest.open(workers)
    other.open(workers)
    assert opened == [(["GPU-0", "GPU-1"], 20.0)]  # rank 0 reads both GPUs of host a; rank 1 nothing
    assert lowest.reader is not None and other.reader is None
    for m in (lowest, other):
        assert m.on and m.source == "estimated,nvml+rapl" and m.totals["energy_estimated"] is True


def test_energy_meter_sums_nodes_per_window_and_derives_the_keys(monkeypatch):
    monkeypatch.setattr(energy_mod, "open_node_energy", lambda uuids, watts, s: FakeNode(step_j=1.8e6))
    comm = FakeComm(nodes=2)  # two alike nodes: the sum doubles this node's joules
    m = EnergyMeter(_energy_cfg(grid_g_per_kwh=400, pue=1.5), _info(comm))
    m.flush()
    assert comm.calls == [] and m.totals["energy_j"] == 0.0  # off until opened: no collective
    m.open([{"rank": 0, "host": "h", "gpu": None}])
    m.flush()
    m.flush()
    assert m.win_energy_j == pytest.approx(7.2e6) and m.power_w(3600.0) == pytest.approx(2000.0)
    m.reset_window()
    assert m.win_energy_j == 0.0 and m.totals["energy_j"] == pytest.approx(7.2e6)  # 2 kWh
    keys = m.keys(samples=1000, tokens=None)
    assert keys["energy_kwh"] == pytest.approx(2.0) and keys["co2e_kg"] == pytest.approx(1.2)
    assert keys["j_per_sample"] == pytest.approx(7200.0) and "j_per_token" not in keys
    assert m.keys(samples=0, tokens=0)["j_per_sample"] is None and m.keys(0, 0)["j_per_token"] is None
    assert m.keys(1, 7200)["j_per_token"] == pytest.approx(1000.0)
    reader = m.reader
    m.close()
    assert reader.closed and m.reader is None


def test_find_peak_prefers_the_config_then_the_gpu_table_then_the_probe(monkeypatch, caplog):
    comm = FakeComm(mean=3.5e11)
    assert find_peak(2.0, "fp32", torch.device("cpu"), comm) == (2e12, "metrics.peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    peak, source = find_peak(None, "bf16", torch.device("cuda"), comm)
    assert peak == pytest.approx(989.4e12) and "H100 SXM" in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA GeForce GTX 1080")
    with caplog.at_level("WARNING", logger="distrain.metrics.peak"):
        assert find_peak(None, "fp32", torch.device("cuda"), comm)[0] is None
    assert "MFU is not reported" in caplog.text and comm.calls == []  # no collective off the CPU path
    assert find_peak(None, "bf16", torch.device("cpu"), comm) == (3.5e11, "CPU matmul probe (bfloat16)")
    assert comm.calls == ["barrier", "mean"]  # every rank probes at once; one figure for the job


def test_meters_checkpoint_the_same_flat_totals(monkeypatch):
    monkeypatch.setattr(energy_mod, "open_node_energy", lambda uuids, watts, s: FakeNode(source="rapl"))
    cfg = load_config(CONFIGS / "gpt-cpu-tiny.yaml", ["metrics.peak_tflops=1.0"])
    m = Meters(cfg, _info(HostComm()), per_step_samples=8, tokens_per_sample=16, flops_per_sample=1e3)
    m.start([{"rank": 0, "host": "h", "gpu": None}])
    assert (m.peak, m.peak_source, m.energy_source) == (1e12, "metrics.peak_tflops", "rapl")
    m.step_done()
    m.record()
    state = m.state_dict()
    # the keys every checkpoint so far holds, in their order: older checkpoints keep loading
    assert list(state) == [
        "samples",
        "tokens",
        "flops",
        "energy_j",
        "elapsed_s",
        "data_wait_s",
        "mfu_time_s",
        "mfu_x_time",
        "energy_estimated",
    ]
    assert set(state) == set(m.throughput.totals) | set(m.energy_meter.totals)  # each meter's, all saved
    assert state["samples"] == 8 and state["tokens"] == 128 and state["energy_j"] == pytest.approx(10.0)
    m.totals["energy_j"] = 99.0  # the flat view writes where each total lives
    assert m.energy_meter.totals["energy_j"] == 99.0 and m.summary()["energy_j"] == 99.0
    fresh = Meters(cfg, _info(HostComm()), per_step_samples=8, tokens_per_sample=16, flops_per_sample=1e3)
    fresh.load_state_dict({"samples": 24, "energy_j": 5})  # missing keys keep their defaults
    assert fresh.state_dict() == {
        **dict.fromkeys(state, 0.0),
        "samples": 24,
        "tokens": 0,
        "energy_j": 5.0,
        "energy_estimated": False,
    }
    m.close()


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
    recs = [r for r in records if "loss" in r]
    assert recs
    for r in recs:
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
    cli("report", run_dir, timeout=120, check=True)
    out = run_dir / "report"
    for png in ("loss.png", "throughput.png", "mfu.png", "power.png", "energy.png"):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG"
    md = (out / "report.md").read_text()
    assert "| steps | 8/8 |" in md and f"{summary['tokens_seen']:,}" in md and "(estimated)" in md
    bad = cli("report", tmp_path, timeout=120)
    assert bad.returncode == 1 and "metrics.jsonl does not exist" in bad.stderr


def test_docs_document_every_metrics_key(in_workdir, tmp_path):
    _, records, _ = _train(tmp_path, "train.eval_every=4")
    keys = set().union(*records)
    assert "loss" in keys and "eval_loss" in keys
    page = (REPO / "docs" / "metrics.md").read_text()
    section = page[page.index("## `metrics.jsonl` keys") : page.index("## FLOPs and MFU")]
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
    try:
        p = cli(
            "train",
            CONFIGS / "gpt-cpu-tiny.yaml",
            f"run.dir={run_dir}",
            "train.steps=40",
            "train.log_every=10",
            "checkpoint.at_end=false",
            "cluster.workers=2",
            env={**os.environ, "DISTRAIN_POWERCAP_ROOT": str(root)},
            ranks=2,
        )
    finally:
        stop.set()
        th.join()
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert all(r["energy_source"] == "rapl" and r["energy_estimated"] is False for r in recs)
    powers = sorted(r["power_w"] for r in recs)
    assert 35 < powers[len(powers) // 2] < 65, powers  # twice the node's power would be ~100 W
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["energy_j"] == pytest.approx(50 * summary["elapsed_s"], rel=0.3)


def test_without_the_gpu_extra_gpu_energy_is_unmeasured_and_the_warning_names_the_extra(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with caplog.at_level("WARNING", logger=energy_mod.log.name):
        node = energy_mod.open_node_energy(["GPU-0"], cpu_watts=100.0)
    assert "pip install 'distrain[gpu]'" in caplog.text
    assert node.source.endswith("+gpus_unmeasured")  # GPU energy is unknown, not guessed
    node.close()
