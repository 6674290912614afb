"""A background sampler that turns "fast / slow, watch nvidia-smi" into a timeline of numbers.

``Monitor`` samples a process (this one by default, or any pid, e.g. a server) every
``interval_s`` seconds on a daemon thread and records host memory (RSS), CPU use and
cumulative CPU seconds, energy where the hardware exposes a counter (Intel/AMD RAPL via
powercap on the CPU path; NVML's energy counter or power on NVIDIA GPUs), and GPU memory,
power and utilization when NVML is usable. Callers mark phases (load, prefill, decode,
idle) so the timeline and ``plot()`` show what the machine was doing when.

Nothing is invented: a quantity the machine does not expose is NaN, and ``backend`` /
``energy_source`` say which path produced the numbers.

    with Monitor() as mon:
        with mon.phase("load"):
            lm = load_model("default")
        mon.mark("decode")
        ...
    mon.to_frame(); mon.plot()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Iterator

import psutil

from llama_lab.profiling.readers import NAN, RAPL_GLOB, NvmlReader, RaplReader, cpu_name

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

PHASE_COLORS = {"load": "tab:gray", "prefill": "tab:orange", "decode": "tab:green", "idle": "tab:blue"}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading. Cumulative fields count from the monitor's start; missing ones are NaN."""

    t: float  # seconds since the monitor started
    rss_bytes: int
    cpu_percent: float  # of one core, like top: 200 means two cores busy
    cpu_seconds: float  # user + system CPU seconds of the watched process since start
    energy_j: float  # cumulative joules since start (RAPL package or GPU counter), NaN if unavailable
    power_w: float  # average power over the last interval (or NVML's instantaneous power)
    gpu_mem_used_bytes: float = NAN  # whole device, what nvidia-smi shows
    gpu_proc_mem_bytes: float = NAN  # the watched pid's share, where the driver reports it
    gpu_util_percent: float = NAN
    gpu_mem_util_percent: float = NAN
    gpu_power_w: float = NAN


@dataclasses.dataclass
class Phase:
    """A named interval of the timeline, in monitor seconds; ``end`` is None while open."""

    name: str
    start: float
    end: float | None = None


# ---------------------------------------------------------------- energy: RAPL

class Monitor:
    """Samples a process (and the GPU, when NVML works) on a background thread.

    ``gpu`` is ``"auto"`` (NVML if it initializes, else the CPU path), ``True`` (NVML or
    raise) or ``False`` (CPU path only). ``backend`` says which one is in use.
    """

    def __init__(
        self,
        interval_s: float = 0.1,
        pid: int | None = None,
        gpu: bool | str = "auto",
        gpu_index: int | None = None,
        rapl_glob: str = RAPL_GLOB,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.pid = pid if pid is not None else os.getpid()
        self._proc = psutil.Process(self.pid)
        self._gpu_wanted = gpu
        self._gpu_index = gpu_index
        self._rapl_glob = rapl_glob
        self.samples: list[Sample] = []
        self.phases: list[Phase] = []
        self._mark: Phase | None = None
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: NvmlReader | None = None
        self._rapl: RaplReader | None = None
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._prev: tuple[float, float, float] = (0.0, 0.0, 0.0)  # t, cpu_seconds, energy
        self.backend = "cpu"
        self.energy_source = "unavailable"
        self.device_name = ""

    # -- lifecycle

    def start(self) -> "Monitor":
        """Open the readers, take a first sample and start the sampler thread."""
        if self._thread is not None:
            raise RuntimeError("this Monitor is already running; create a new one for another run")
        self._open_readers()
        self._t0 = time.perf_counter()
        self._cpu0 = self._cpu_seconds_abs()
        self._prev = (0.0, 0.0, 0.0)
        self.sample_now()
        self._thread = threading.Thread(target=self._run, name=f"llama_lab-monitor-{self.pid}", daemon=True)
        self._thread.start()
        logger.info("monitor on pid %d: backend=%s (%s), energy=%s, every %.0f ms",
                    self.pid, self.backend, self.device_name, self.energy_source, self.interval_s * 1000)
        return self

    def stop(self) -> "Monitor":
        """Stop sampling (idempotent); closes an open ``mark`` phase and takes a last sample."""
        if self._thread is None or self._stop.is_set():
            return self
        self._stop.set()
        self._thread.join(timeout=max(5.0, 10 * self.interval_s))
        now = self.elapsed()
        with contextlib.suppress(psutil.Error):  # the watched process may have exited
            now = self.sample_now().t
        with self._lock:
            if self._mark is not None:
                self._mark.end = now
                self._mark = None
            for ph in self.phases:  # a phase() block still open when the monitor stops
                if ph.end is None:
                    ph.end = now
        if self._nvml is not None:
            self._nvml.close()
        return self

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def _open_readers(self) -> None:
        if self._gpu_wanted:
            try:
                self._nvml = NvmlReader(self._gpu_index, self.pid)
            except RuntimeError as exc:
                if self._gpu_wanted is True:
                    raise
                logger.info("GPU monitoring off (%s); using the CPU path", exc)
        if self._nvml is not None:
            self.backend, self.device_name = "nvml", self._nvml.name
            if self._nvml.has_energy_counter:
                self.energy_source = "nvml"
            else:
                self.energy_source = "nvml-power-integral"
        else:
            self.backend, self.device_name = "cpu", cpu_name()
            rapl = RaplReader(self._rapl_glob)
            if rapl.available:
                self._rapl, self.energy_source = rapl, "rapl"

    # -- sampling

    def elapsed(self) -> float:
        """Seconds since ``start()``, on the clock samples and phases use."""
        return time.perf_counter() - self._t0

    def _cpu_seconds_abs(self) -> float:
        times = self._proc.cpu_times()
        return times.user + times.system

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_now()
            except psutil.NoSuchProcess:
                logger.info("monitored pid %d exited; monitor stops sampling", self.pid)
                return
            except Exception:  # never let a sampler glitch kill the thread silently
                logger.exception("monitor sample failed")

    def sample_now(self) -> Sample:
        """Take one sample immediately (the thread calls this; so do phase boundaries)."""
        with self._sample_lock:  # psutil's oneshot cache and the deltas below are not thread-safe
            return self._sample_locked()

    def _sample_locked(self) -> Sample:
        with self._proc.oneshot():
            rss = self._proc.memory_info().rss
            cpu_s = self._cpu_seconds_abs() - self._cpu0
        gpu = self._nvml.read() if self._nvml is not None else {}
        with self._lock:
            t = self.elapsed()
            t_prev, _, e_prev = self._prev
            dt = t - t_prev
            cpu_pct = self._cpu_percent_since(t, cpu_s)
            if self._rapl is not None:
                energy = self._rapl.read_joules()
            elif self._nvml is not None and self.energy_source == "nvml":
                energy = gpu.get("gpu_energy_j", NAN)
            elif self._nvml is not None and not math.isnan(gpu.get("gpu_power_w", NAN)):
                # no counter on this GPU: integrate the power readings (trapezoid on the last step)
                last_p = self.samples[-1].gpu_power_w if self.samples else gpu["gpu_power_w"]
                energy = (e_prev if self.samples else 0.0) + 0.5 * (last_p + gpu["gpu_power_w"]) * max(dt, 0.0)
            else:
                energy = NAN
            if self.energy_source == "nvml" or self.energy_source == "rapl":
                power = (energy - e_prev) / dt if dt > 0 and self.samples else NAN
            else:
                power = gpu.get("gpu_power_w", NAN)
            sample = Sample(
                t=t, rss_bytes=rss, cpu_percent=cpu_pct, cpu_seconds=cpu_s, energy_j=energy, power_w=power,
                gpu_mem_used_bytes=gpu.get("gpu_mem_used_bytes", NAN),
                gpu_proc_mem_bytes=gpu.get("gpu_proc_mem_bytes", NAN),
                gpu_util_percent=gpu.get("gpu_util_percent", NAN),
                gpu_mem_util_percent=gpu.get("gpu_mem_util_percent", NAN),
                gpu_power_w=gpu.get("gpu_power_w", NAN),
            )
            self.samples.append(sample)
            self._prev = (t, cpu_s, energy)
        return sample

    def _cpu_percent_since(self, t: float, cpu_s: float) -> float:
        """CPU % over at least half an interval: extra samples at phase edges (ms apart) don't spike."""
        ref = None
        for prev in reversed(self.samples):
            ref = prev
            if t - prev.t >= 0.5 * self.interval_s:
                break
        if ref is None or t <= ref.t:
            return NAN
        return 100.0 * (cpu_s - ref.cpu_seconds) / (t - ref.t)

    # -- phases

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Mark the enclosed block as phase ``name``; samples are taken at both edges."""
        ph = Phase(name, self.sample_now().t)  # boundaries sit on a sample, so window deltas are exact
        with self._lock:
            self.phases.append(ph)
        try:
            yield ph
        finally:
            ph.end = self.sample_now().t

    def mark(self, name: str | None) -> None:
        """End the current ``mark`` phase and start ``name`` (``None``: just end it)."""
        now = self.sample_now().t
        with self._lock:
            if self._mark is not None:
                self._mark.end = now
            self._mark = Phase(name, now) if name else None
            if self._mark is not None:
                self.phases.append(self._mark)

    def clock(self, perf_counter_value: float) -> float:
        """Convert a ``time.perf_counter()`` reading taken elsewhere (e.g. an engine callback) to monitor time."""
        return perf_counter_value - self._t0

    def add_phase(self, name: str, start: float, end: float) -> Phase:
        """Record a phase measured after the fact (monitor times; see ``clock``)."""
        ph = Phase(name, start, end)
        with self._lock:
            self.phases.append(ph)
        return ph

    # -- results

    def to_frame(self) -> "pd.DataFrame":
        """The timeline, one row per sample, with MB columns and the phase each sample fell in."""
        import pandas as pd

        with self._lock:
            rows = [dataclasses.asdict(s) for s in self.samples]
            phases = [(p.name, p.start, p.end) for p in self.phases]
        df = pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(Sample)])
        df["rss_mb"] = df["rss_bytes"] / 2**20
        df["gpu_mem_used_mb"] = df["gpu_mem_used_bytes"] / 2**20
        labels = []
        for t in df["t"]:
            label = ""
            for name, start, end in phases:  # the latest phase that covers t wins (nested blocks)
                if start <= t and (end is None or t <= end):
                    label = name
            labels.append(label)
        df["phase"] = labels
        return df

    def phases_frame(self) -> "pd.DataFrame":
        import pandas as pd

        with self._lock:
            return pd.DataFrame([dataclasses.asdict(p) for p in self.phases], columns=["name", "start", "end"])

    def summary(self, start: float | None = None, end: float | None = None) -> "WindowStats":
        """Peak/mean figures and deltas between two monitor times (defaults: the whole run)."""
        with self._lock:
            samples = list(self.samples)
        lo = start if start is not None else -math.inf
        hi = end if end is not None else math.inf
        inside = [s for s in samples if lo <= s.t <= hi]
        if not inside:
            return WindowStats.empty()
        first, last = inside[0], inside[-1]
        dt = last.t - first.t
        cpu_s = last.cpu_seconds - first.cpu_seconds
        energy = last.energy_j - first.energy_j
        gpu_mem = [s.gpu_mem_used_bytes for s in inside if not math.isnan(s.gpu_mem_used_bytes)]
        return WindowStats(
            seconds=dt,
            samples=len(inside),
            peak_rss_bytes=max(s.rss_bytes for s in inside),
            cpu_seconds=cpu_s,
            mean_cpu_percent=100.0 * cpu_s / dt if dt > 0 else NAN,
            energy_j=energy,
            mean_power_w=energy / dt if dt > 0 and not math.isnan(energy) else NAN,
            peak_gpu_mem_bytes=max(gpu_mem) if gpu_mem else NAN,
        )

    def phase_summary(self, name: str) -> "WindowStats":
        """``summary`` over the last phase called ``name``."""
        for ph in reversed(self.phases):
            if ph.name == name:
                return self.summary(ph.start, ph.end)
        raise KeyError(f"no phase named {name!r}; phases: {[p.name for p in self.phases]}")

    def plot(self, title: str | None = None) -> "Figure":
        """Memory, CPU/GPU utilization and power over time, with phases as shaded spans."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        df = self.to_frame()
        has_gpu = self.backend == "nvml"
        has_power = df["power_w"].notna().any() or df["gpu_power_w"].notna().any()
        rows = 3 if has_power else 2
        fig = Figure(figsize=(10, 2.4 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, 1, sharex=True)

        ax = axes[0]
        ax.plot(df["t"], df["rss_mb"], label=f"process RSS (pid {self.pid})")
        if has_gpu:
            ax.plot(df["t"], df["gpu_mem_used_mb"], label="GPU memory used (device)")
            ax.plot(df["t"], df["gpu_proc_mem_bytes"] / 2**20, label="GPU memory (this pid)", linestyle="--")
        ax.set_ylabel("MiB")
        ax.legend(loc="upper left", fontsize="small")

        ax = axes[1]
        ax.plot(df["t"], df["cpu_percent"], label="CPU % (100 = one core)")
        if has_gpu:
            ax.plot(df["t"], df["gpu_util_percent"], label="GPU utilization %")
        ax.set_ylabel("%")
        ax.legend(loc="upper left", fontsize="small")

        if has_power:
            ax = axes[2]
            if df["power_w"].notna().any():
                ax.plot(df["t"], df["power_w"], label=f"power ({self.energy_source})")
            if has_gpu and self.energy_source == "nvml":
                ax.plot(df["t"], df["gpu_power_w"], label="GPU power (NVML instant)", alpha=0.6)
            ax.set_ylabel("W")
            ax.legend(loc="upper left", fontsize="small")
        axes[-1].set_xlabel("seconds")

        seen: dict[str, str] = {}
        extra = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red"])
        t_end = float(df["t"].max()) if len(df) else 0.0
        for ph in self.phases:
            color = seen.get(ph.name) or PHASE_COLORS.get(ph.name) or next(extra, "tab:gray")
            seen[ph.name] = color
            for a in axes:
                a.axvspan(ph.start, ph.end if ph.end is not None else t_end, color=color, alpha=0.15, linewidth=0)
        if seen:
            fig.legend(handles=[Patch(color=c, alpha=0.3, label=n) for n, c in seen.items()],
                       loc="outside upper right", ncols=len(seen), fontsize="small")
        energy_note = "" if self.energy_source != "unavailable" else ", energy: not exposed here"
        fig.suptitle(title or f"{self.backend} monitor: {self.device_name}{energy_note}", fontsize="medium")
        _show_in_notebooks()
        return fig


@dataclasses.dataclass(frozen=True)
class WindowStats:
    """Figures for one window of the timeline (a phase, or the whole run)."""

    seconds: float
    samples: int
    peak_rss_bytes: int
    cpu_seconds: float
    mean_cpu_percent: float
    energy_j: float
    mean_power_w: float
    peak_gpu_mem_bytes: float

    @classmethod
    def empty(cls) -> "WindowStats":
        return cls(0.0, 0, 0, 0.0, NAN, NAN, NAN, NAN)


def _show_in_notebooks() -> None:
    """Let a notebook render a pyplot-free ``Figure`` returned by ``plot()`` as an image.

    ``plot()`` avoids pyplot so scripts and threads never touch global figure state; IPython only
    knows how to draw a Figure once pyplot's inline backend has been set up, so register it here.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters["image/png"]
    png.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
