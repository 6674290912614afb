"""What the machine exposes, read without guessing: RAPL energy on the CPU, NVML on NVIDIA GPUs,
and a process's CPU name and peak RSS.

A reader whose source is missing says so (``available``), so the monitor reports NaN instead of
an invented figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NAN = float("nan")
RAPL_GLOB = "/sys/class/powercap/intel-rapl:*"


@dataclasses.dataclass
class _RaplDomain:
    path: Path
    max_uj: int
    last_uj: int
    total_uj: int = 0


class RaplReader:
    """Package-level RAPL counters (``intel-rapl:N``, not their sub-domains, to avoid double counting).

    The counters wrap at ``max_energy_range_uj``; each read adds the wrapped-corrected delta.
    On most distributions ``energy_uj`` is root-only since CVE-2020-8694, so this is often absent.
    """

    def __init__(self, root_glob: str = RAPL_GLOB) -> None:
        self.domains: list[_RaplDomain] = []
        for d in sorted(glob.glob(root_glob)):
            if d.count(":") != 1:  # intel-rapl:0:1 is a sub-domain (core, dram) of intel-rapl:0
                continue
            try:
                energy = int(Path(d, "energy_uj").read_text())
                max_uj = int(Path(d, "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            self.domains.append(_RaplDomain(Path(d, "energy_uj"), max_uj, energy))

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read_joules(self) -> float:
        """Joules consumed by all packages since this reader was created."""
        for dom in self.domains:
            try:
                now = int(dom.path.read_text())
            except (OSError, ValueError):
                continue
            delta = now - dom.last_uj
            if delta < 0:  # wrapped around
                delta += dom.max_uj
            dom.total_uj += delta
            dom.last_uj = now
        return sum(d.total_uj for d in self.domains) / 1e6


# ---------------------------------------------------------------- GPU: NVML

class NvmlReader:
    """One NVIDIA GPU through NVML; raises ``RuntimeError`` when NVML or the GPU is not there.

    Each quantity is probed once; a call the GPU does not support (``NVML_ERROR_NOT_SUPPORTED``,
    e.g. the energy counter before Volta, or per-process memory inside some containers) is
    dropped for the rest of the run instead of raising every sample.
    """

    def __init__(self, index: int | None = None, pid: int | None = None) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise RuntimeError("nvidia-ml-py is not installed") from exc
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise RuntimeError(f"NVML unavailable: {exc}") from exc
        self._nvml = pynvml
        self.pid = pid if pid is not None else os.getpid()
        try:
            self.handle = self._open_handle(index)
        except Exception as exc:
            pynvml.nvmlShutdown()
            raise RuntimeError(f"no NVIDIA GPU visible to NVML: {exc}") from exc
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self._ok = {"energy": True, "power": True, "util": True, "procs": True}
        self._energy0 = self._try("energy", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        if self._energy0 is None:
            self._ok["energy"] = False

    def _open_handle(self, index: int | None) -> Any:
        """Map the CUDA device index to NVML's, honouring ``CUDA_VISIBLE_DEVICES`` (ints or UUIDs)."""
        nv = self._nvml
        if index is None:
            index = 0
            torch = sys.modules.get("torch")
            # only ask torch when CUDA is already up: current_device() would otherwise create a
            # CUDA context (~0.5 GiB) in a process that may only be watching a server
            if torch is not None and torch.cuda.is_initialized():
                index = torch.cuda.current_device()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if index < len(visible):
            entry = visible[index]
            if entry.isdigit():
                return nv.nvmlDeviceGetHandleByIndex(int(entry))
            return nv.nvmlDeviceGetHandleByUUID(entry if entry.startswith(("GPU-", "MIG-")) else f"GPU-{entry}")
        if nv.nvmlDeviceGetCount() <= index:
            raise RuntimeError(f"GPU index {index} out of range")
        return nv.nvmlDeviceGetHandleByIndex(index)

    def _try(self, key: str, fn: Any) -> Any:
        if not self._ok[key]:
            return None
        try:
            return fn()
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) == self._nvml.NVML_ERROR_NOT_SUPPORTED:
                self._ok[key] = False
                logger.info("NVML: %s is not supported on %s; reported as NaN", key, self.name)
            return None

    @property
    def has_energy_counter(self) -> bool:
        return self._ok["energy"]

    def read(self) -> dict[str, float]:
        nv, h = self._nvml, self.handle
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        out = {"gpu_mem_used_bytes": float(mem.used)}
        power = self._try("power", lambda: nv.nvmlDeviceGetPowerUsage(h))  # milliwatts
        out["gpu_power_w"] = power / 1000.0 if power is not None else NAN
        util = self._try("util", lambda: nv.nvmlDeviceGetUtilizationRates(h))
        out["gpu_util_percent"] = float(util.gpu) if util is not None else NAN
        out["gpu_mem_util_percent"] = float(util.memory) if util is not None else NAN
        energy = self._try("energy", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h))  # millijoules
        out["gpu_energy_j"] = (energy - self._energy0) / 1000.0 if energy is not None else NAN
        procs = self._try("procs", lambda: nv.nvmlDeviceGetComputeRunningProcesses(h))
        used = NAN
        for p in procs or []:
            if p.pid == self.pid and p.usedGpuMemory is not None:
                used = float(p.usedGpuMemory)
        out["gpu_proc_mem_bytes"] = used
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def _cpuinfo() -> tuple[str, set[str]]:
    """The first ``model name`` and ``flags`` of /proc/cpuinfo (empty where there is none)."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return model, flags


def cpu_name() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo), else ``platform.processor()``."""
    model, _ = _cpuinfo()
    if model:
        return model
    import platform

    return platform.processor() or platform.machine()


def cpu_isa(flags: set[str] | None = None) -> str:
    """The vector ISA that decides which kernels run: 'AVX512 + AVX512-BF16', 'AVX512', 'AVX2-only (no AVX512)'."""
    if flags is None:
        flags = _cpuinfo()[1]
    if "avx512f" in flags:
        return "AVX512" + (" + AVX512-BF16" if "avx512_bf16" in flags else "")
    return "AVX2-only (no AVX512)" if "avx2" in flags else "no AVX2"


def cpu_kind() -> str:
    """'AMD EPYC 7B13, 2 CPUs, AVX2-only (no AVX512)': what a speed figure was measured on.

    Speeds differ ~3x between the AVX2 and AVX512-BF16 machines this project runs on, so every
    benchmark prints this beside its figures.
    """
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} CPUs, {cpu_isa()}"


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the OS (glibc keeps it otherwise): after a load, whose
    parsing (a 49k-token tokenizer's JSON: ~30 MB) is garbage once done, and when the engine's batch empties."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def reset_peak_rss() -> bool:
    """Reset this process's high-water RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int | None = None) -> int | None:
    """The high-water RSS of a process (``VmHWM``), exact where the sampler could miss a spike."""
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
