"""The engine's C++ CPU operators, built once per machine into one library and loaded on first use.

Two sources, one build: ``csrc/paged_attention.cpp`` (``torch.ops.llama_lab.paged_attention``) and
``csrc/quant_linear.cpp`` (``q4_linear``, ``q5_linear``, ``q8_linear``, their ``_rows`` lookups, and the
grammar bitmask's ``apply_token_bitmask_``). They are compiled
with the local C++ compiler and ``-march=native`` (so the AVX2 or AVX512-BF16 paths the CPU has are
the ones built), in parallel by ninja, and cached beside the converted models under a key of the
sources, torch and the CPU's flags. Without a compiler the engine keeps torch's own operators.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import threading
from importlib.resources import files
from pathlib import Path

import torch

from llama_lab.cache import cache_root

logger = logging.getLogger(__name__)

SOURCES = ("paged_attention.cpp", "quant_linear.cpp")

_LOCK = threading.Lock()
_STATE: dict[str, str | bool] = {}  # "loaded" -> True, or "error" -> why it could not be built


def cpu_flags() -> str:
    """The CPU's feature flags: code built for this machine (-march=native, inductor's) is keyed by them."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _source(name: str) -> Path:
    return Path(str(files("llama_lab.kernels") / "csrc" / name))


def _extra_cflags() -> str:
    """``LLAMA_LAB_KERNEL_CFLAGS``, appended to the build's flags: ``-mno-avx512f`` builds the AVX2 path on an
    AVX512 CPU, so that the two can be measured on one machine (``bench/kernel_bench.py``)."""
    return os.environ.get("LLAMA_LAB_KERNEL_CFLAGS", "").strip()


def kernel_path() -> str:
    """Which loops the quantized kernels run here: 'AVX512 + VNNI', 'AVX512', 'AVX2' or 'scalar'."""
    flags, extra = set(cpu_flags().split()), _extra_cflags().split()
    if "avx512bw" in flags and not {"-mno-avx512f", "-mno-avx512bw"} & set(extra):
        return "AVX512" + (" + VNNI" if "avx512_vnni" in flags and "-mno-avx512vnni" not in extra else "")
    if {"avx2", "fma", "f16c"} <= flags and "-mno-avx2" not in extra:
        return "AVX2"
    return "scalar"


def build_dir() -> Path:
    """Where the library lives: keyed by the sources, torch and the CPU (it is built -march=native)."""
    h = hashlib.sha256(torch.__version__.encode() + cpu_flags().encode() + _extra_cflags().encode())
    for name in SOURCES:
        h.update(_source(name).read_bytes())
    return cache_root() / "kernels" / f"cpu_ops-{h.hexdigest()[:16]}"


def load() -> str | None:
    """Build (first time on a machine, ~20-40 s) and load the operators; None when loaded, else why not.

    ``LLAMA_LAB_CPU_KERNEL=0`` turns them off (torch's operators run instead).
    """
    if os.environ.get("LLAMA_LAB_CPU_KERNEL", "1") == "0":
        return "LLAMA_LAB_CPU_KERNEL=0"
    with _LOCK:
        if "loaded" in _STATE:
            return None
        if "error" in _STATE:
            return str(_STATE["error"])
        try:
            _build_and_load()
        except Exception as exc:  # no compiler, no ninja, an exotic platform: torch's operators still work
            _STATE["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.warning("the CPU kernels could not be built (%s); using torch's operators", _STATE["error"])
            return str(_STATE["error"])
        _STATE["loaded"] = True
        return None


LIBRARY = "llama_lab_cpu_ops"


def _build_and_load() -> None:
    """Load the library from the cache, or build it in a private directory and publish it by rename.

    torch's ``cpp_extension`` guards a shared build directory with a lock file; a process killed while
    building leaves that file behind and every later start waits on it forever. A private directory
    per build needs no lock, and the rename publishes a complete library or nothing.
    """
    if hasattr(torch.ops.llama_lab, "q4_linear"):  # already loaded in this process
        _register_fakes()
        return
    target = build_dir() / f"{LIBRARY}.so"
    if target.is_file():
        torch.ops.load_library(str(target))
    else:
        from torch.utils import cpp_extension

        flags = ["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
        flags += _extra_cflags().split()
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("building the CPU kernels (once per machine, into %s)", target.parent)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
            cpp_extension.load(name=LIBRARY, sources=[str(_source(n)) for n in SOURCES], extra_cflags=flags,
                               extra_ldflags=["-fopenmp"], build_directory=tmp, is_python_module=False,
                               verbose=False)  # loads it too
            os.replace(Path(tmp) / f"{LIBRARY}.so", target)
    _register_fakes()


def _register_fakes() -> None:
    """Output shapes for torch.export / torch.compile, which trace the step without running the kernels."""
    if torch._library.simple_registry.singleton.find("llama_lab::q4_linear").fake_impl.kernel is not None:
        return  # registered once per process

    @torch.library.register_fake("llama_lab::paged_attention")
    def _attention(q, k_cache, v_cache, block_tables, rows, positions, scale):
        return torch.empty_like(q)

    @torch.library.register_fake("llama_lab::q4_linear")
    def _q4_linear(x, qs, d, m, prompt=False):
        return x.new_empty((x.shape[0], qs.shape[0]))

    @torch.library.register_fake("llama_lab::q5_linear")
    def _q5_linear(x, qs, qh, d, m, prompt=False):
        return x.new_empty((x.shape[0], qs.shape[0]))

    @torch.library.register_fake("llama_lab::q5_rows")
    def _q5_rows(ids, qs, qh, d, m):
        return d.new_empty((ids.shape[0], qs.shape[1] * 2), dtype=torch.float32)

    @torch.library.register_fake("llama_lab::q8_linear")
    def _q8_linear(x, qs, d, prompt=False):
        return x.new_empty((x.shape[0], qs.shape[0]))

    @torch.library.register_fake("llama_lab::q4_rows")
    def _q4_rows(ids, qs, d, m):
        return d.new_empty((ids.shape[0], qs.shape[1] * 2), dtype=torch.float32)

    @torch.library.register_fake("llama_lab::q8_rows")
    def _q8_rows(ids, qs, d):
        return d.new_empty((ids.shape[0], qs.shape[1]), dtype=torch.float32)
