"""The monitor's CPU path against psutil and os.times(), phases, plots, RAPL and the NVML reader."""

from __future__ import annotations

import math
import mmap
import os
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest

from llama_lab.profiling import Monitor, NvmlReader, RaplReader, peak_rss_bytes, reset_peak_rss


def test_cpu_path_when_nvml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError, as on a box without it
    with Monitor(interval_s=0.02) as mon:
        time.sleep(0.1)
    assert mon.backend == "cpu"
    assert mon.device_name
    df = mon.to_frame()
    assert len(df) >= 3
    assert df["gpu_mem_used_bytes"].isna().all()
    if mon.energy_source == "unavailable":  # never invented: no counter, no numbers
        assert df["energy_j"].isna().all() and df["power_w"].isna().all()
    with pytest.raises(RuntimeError):
        Monitor(gpu=True).start()  # asking for the GPU explicitly fails loudly instead


def test_rss_matches_psutil_and_follows_allocations():
    proc = psutil.Process()
    with Monitor(interval_s=0.02, gpu=False) as mon:
        before = mon.sample_now().rss_bytes
        # a fresh anonymous mapping: malloc could reuse pages a long test session already holds
        block = mmap.mmap(-1, 200 * 2**20)
        for i in range(0, len(block), 4096):  # touch every page so it is resident
            block[i] = 1
        time.sleep(0.1)
        ours = mon.sample_now().rss_bytes
        theirs = proc.memory_info().rss
        assert abs(ours - theirs) <= 0.05 * theirs
        assert ours - before >= 180 * 2**20
        block.close()
    timeline = mon.to_frame()
    assert timeline["rss_bytes"].max() - timeline["rss_bytes"].iloc[0] >= 180 * 2**20


def burn_cpu(cpu_seconds: float) -> None:
    """Spin until this process has used ``cpu_seconds`` of CPU (robust on a shared, busy machine)."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_consistent_with_os_times():
    with Monitor(interval_s=0.05, gpu=False) as mon:
        t0 = os.times()
        with mon.phase("busy"):
            burn_cpu(0.8)
        t1 = os.times()
        with mon.phase("idle"):
            time.sleep(0.4)
    ours = mon.phase_summary("busy")
    reference = (t1.user - t0.user) + (t1.system - t0.system)
    # os.times() ticks at 10 ms; the sampler thread itself adds a little CPU
    assert ours.cpu_seconds == pytest.approx(reference, abs=0.08)
    assert 0.75 <= ours.cpu_seconds <= 1.0
    assert ours.mean_cpu_percent == pytest.approx(100 * ours.cpu_seconds / ours.seconds)
    assert mon.phase_summary("idle").mean_cpu_percent < 25
    df = mon.to_frame()
    assert df["cpu_seconds"].is_monotonic_increasing


def test_watches_another_process_by_pid():
    code = textwrap.dedent("""
        import sys, time
        end = time.process_time() + 0.6
        while time.process_time() < end:
            pass
        print("done", flush=True)
        time.sleep(1.5)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        with Monitor(interval_s=0.05, pid=child.pid, gpu=False) as mon:
            assert mon.pid == child.pid
            assert child.stdout.readline().strip() == "done"
            mon.mark("child sleeping")
            time.sleep(0.5)
    finally:
        child.kill()
        child.wait(timeout=10)
    df = mon.to_frame()
    assert df["cpu_seconds"].iloc[-1] >= 0.55  # the child's CPU, not ours (we were blocked on its pipe)
    assert df["cpu_seconds"].is_monotonic_increasing
    assert mon.phase_summary("child sleeping").mean_cpu_percent < 20


def test_monitor_survives_the_watched_process_exiting():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    mon = Monitor(interval_s=0.02, pid=child.pid, gpu=False).start()
    child.wait(timeout=10)
    time.sleep(0.2)
    mon.stop()
    assert not mon.running
    assert len(mon.samples) >= 2


def test_phases_marks_frame_and_plot():
    with Monitor(interval_s=0.02, gpu=False) as mon:
        with mon.phase("load"):
            time.sleep(0.06)
        mon.mark("prefill")
        burn_cpu(0.03)
        mon.mark("decode")
        burn_cpu(0.05)
        mon.mark("idle")
        time.sleep(0.06)
    names = [p.name for p in mon.phases]
    assert names == ["load", "prefill", "decode", "idle"]
    assert all(p.end is not None and p.end >= p.start for p in mon.phases)
    assert mon.phases[1].end == mon.phases[2].start  # a mark ends the previous one exactly
    df = mon.to_frame()
    assert set(names) <= set(df["phase"])
    assert len(mon.phases_frame()) == 4
    n = len(mon.samples)
    time.sleep(0.1)
    assert len(mon.samples) == n  # stopped means stopped
    fig = mon.plot()
    legend_labels = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    assert {"load", "prefill", "decode", "idle"} <= legend_labels
    assert sum(len(ax.patches) for ax in fig.axes) >= 4 * len(fig.axes) - 4  # one span per phase per axis


def test_rapl_counter_wraparound(tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    sub = tmp_path / "intel-rapl:0:0"  # a sub-domain: must not be double counted
    for d in (pkg, sub):
        d.mkdir()
        (d / "max_energy_range_uj").write_text("1000000\n")
    (pkg / "energy_uj").write_text("900000\n")
    (sub / "energy_uj").write_text("5\n")
    reader = RaplReader(str(tmp_path / "intel-rapl:*"))
    assert reader.available and len(reader.domains) == 1
    (pkg / "energy_uj").write_text("950000\n")
    assert reader.read_joules() == pytest.approx(0.05)
    (pkg / "energy_uj").write_text("50000\n")  # wrapped past 1 J
    assert reader.read_joules() == pytest.approx(0.15)


def test_monitor_energy_from_rapl(tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    pkg.mkdir()
    (pkg / "max_energy_range_uj").write_text(str(2**32))
    (pkg / "energy_uj").write_text("1000000")
    mon = Monitor(interval_s=10, gpu=False, rapl_glob=str(tmp_path / "intel-rapl:*")).start()
    try:
        assert mon.energy_source == "rapl"
        with mon.phase("work"):
            time.sleep(0.2)
            (pkg / "energy_uj").write_text("3000000")  # 2 J during the phase
    finally:
        mon.stop()
    stats = mon.phase_summary("work")
    assert stats.energy_j == pytest.approx(2.0)
    assert stats.mean_power_w == pytest.approx(2.0 / stats.seconds)


def test_peak_rss_reset_and_read():
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting VmHWM")
    low = peak_rss_bytes()
    block = mmap.mmap(-1, 100 * 2**20)  # fresh pages: the heap may reuse memory the session already holds
    for i in range(0, len(block), 4096):
        block[i] = 1
    high = peak_rss_bytes()
    assert high - low >= 90 * 2**20
    block.close()


class _FakeNvml(types.ModuleType):
    """Just enough of pynvml to drive NvmlReader where no GPU exists (units and error handling)."""

    NVML_ERROR_NOT_SUPPORTED = 3

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value

    def __init__(self, energy_supported=True):
        super().__init__("pynvml")
        self.energy_supported = energy_supported
        self.energy_mj = 5_000_000
        self.shutdowns = 0

    def nvmlInit(self): pass
    def nvmlShutdown(self): self.shutdowns += 1
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return f"gpu{i}"
    def nvmlDeviceGetName(self, h): return b"Fake H100"
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    def nvmlDeviceGetPowerUsage(self, h): return 250_000  # milliwatts
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_supported:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self.energy_mj

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * 2**30)]


def test_nvml_reader_units_and_energy_counter(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mon = Monitor(interval_s=10, gpu="auto", gpu_index=0).start()
    try:
        assert mon.backend == "nvml" and mon.device_name == "Fake H100"
        assert mon.energy_source == "nvml"
        with mon.phase("decode"):
            fake.energy_mj += 30_000  # 30 J
    finally:
        mon.stop()
    assert fake.shutdowns == 1
    s = mon.samples[-1]
    assert s.gpu_mem_used_bytes == 3 * 2**30 and s.gpu_proc_mem_bytes == 2 * 2**30
    assert s.gpu_power_w == 250.0 and s.gpu_util_percent == 97
    assert mon.phase_summary("decode").energy_j == pytest.approx(30.0)
    assert mon.phase_summary("decode").peak_gpu_mem_bytes == 3 * 2**30
    assert mon.plot() is not None


def test_nvml_without_energy_counter_integrates_power(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(energy_supported=False))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mon = Monitor(interval_s=10, gpu_index=0).start()
    try:
        assert mon.energy_source == "nvml-power-integral"
        with mon.phase("work"):
            time.sleep(0.2)
    finally:
        mon.stop()
    stats = mon.phase_summary("work")
    assert stats.energy_j == pytest.approx(250.0 * stats.seconds, rel=1e-6)


def test_real_nvml_when_a_gpu_is_present():
    try:
        reader = NvmlReader()
    except RuntimeError as exc:
        pytest.skip(f"no NVML here: {exc}")
    reader.close()
    with Monitor(interval_s=0.05) as mon:
        time.sleep(0.2)
    assert mon.backend == "nvml"
    df = mon.to_frame()
    assert (df["gpu_mem_used_bytes"] > 0).all()
    assert not math.isnan(df["gpu_power_w"].iloc[-1]) or mon.energy_source != "nvml"
