"""Running tests again in a child process whose CPU kernels are built for a narrower instruction set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# the AVX512 loops without the bf16 tiles (Ice Lake: int8 tiles with VNNI) and without VNNI either (Skylake-X),
# the AVX2 loops on an AVX512 CPU, the portable ones without AVX2
NARROWER = ["-mno-avx512bf16", "-mno-avx512bf16 -mno-avx512vnni", "-mno-avx512f", "-mno-avx2"]


def pass_in_narrower_build(cflags: str, test_file: str, selection: str) -> None:
    """Run ``test_file -k selection`` with ``LLAMA_LAB_KERNEL_CFLAGS=cflags`` and require that it passes, none
    skipped: CI's CPU only ever builds its own widest path. Skips where the native build already is that path."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags:
        pytest.skip("not an x86 CPU with AVX2: the native build already is the portable path")
    if cflags == "-mno-avx512f" and " avx512bw" not in flags:
        pytest.skip("no AVX512 here: the native build is the AVX2 path")
    if cflags.startswith("-mno-avx512bf16") and " avx512_bf16" not in flags:
        pytest.skip("no AVX512-BF16 here: the native build already is the path without it (or has no AVX512)")
    env = {**os.environ, "LLAMA_LAB_KERNEL_CFLAGS": cflags}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-500:]
