"""Attention over the paged KV cache: the CPU kernel where it builds, a torch reference everywhere else.

Both take the same arguments: ``q [N, H, D]``, one layer's ``k_cache`` / ``v_cache``
``[KV, num_blocks, block_size, D]`` (head-major), ``block_tables [S, max_blocks]`` (int32), and per query
token its ``rows`` (its sequence's row in the tables) and ``positions``; token ``t`` attends to
keys ``0..positions[t]`` of its sequence. That one rule covers decoding and chunked prefill.

The CPU kernel (``csrc/paged_attention.cpp``) is compiled once per machine with the local C++
compiler and cached beside the converted models; the reference is plain torch (SDPA with a mask)
and is what CUDA and any other device run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from importlib.resources import files
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "op" -> the loaded op, or "error" -> why it could not be built


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        rows: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Paged attention in plain torch: gather each token's blocks, mask keys after its position.

    Gathers ``N x max_blocks`` blocks, so the engine calls it per sequence for prefill chunks
    (``segments``) and once per step for decoding, where every token is its own sequence.
    """
    n, heads, d = q.shape
    kv_heads, _, bs, _ = k_cache.shape
    blocks = block_tables[rows].long()  # [N, MB]
    span = blocks.shape[1] * bs
    k = k_cache[:, blocks].transpose(0, 1).reshape(n, kv_heads, span, d)  # [KV, N, MB, BS, D] -> [N, KV, span, D]
    v = v_cache[:, blocks].transpose(0, 1).reshape(n, kv_heads, span, d)
    keep = torch.arange(span, device=q.device)[None, :] <= positions[:, None]  # [N, span]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=keep[:, None, None, :], scale=scale,
                                         enable_gqa=heads != kv_heads)
    return out[:, :, 0, :]


def reference_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor,
                      first_position: int, scale: float) -> torch.Tensor:
    """One sequence's chunk of ``T`` consecutive tokens starting at ``first_position`` (reference path)."""
    t, heads, d = q.shape
    kv_heads, _, bs, _ = k_cache.shape
    length = first_position + t
    nb = (length + bs - 1) // bs
    blocks = table_row[:nb].long()
    k = k_cache[:, blocks].reshape(kv_heads, nb * bs, d)[:, :length]
    v = v_cache[:, blocks].reshape(kv_heads, nb * bs, d)[:, :length]
    qpos = torch.arange(first_position, length, device=q.device)
    keep = torch.arange(length, device=q.device)[None, :] <= qpos[:, None]  # [T, L]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=keep, scale=scale,
                                         enable_gqa=heads != kv_heads)
    return out[0].transpose(0, 1)


def cpu_flags() -> str:
    """The CPU's feature flags: code built for this machine (-march=native, inductor's) is keyed by them."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_dir() -> Path:
    """Where the compiled kernel lives: keyed by the source, torch and the CPU (it is built -march=native)."""
    from llama_lab.model.loading import cache_root

    source = (files("llama_lab.engine") / "csrc" / "paged_attention.cpp").read_bytes()
    key = hashlib.sha256(source + torch.__version__.encode() + cpu_flags().encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"paged_attention-{key}"


def cpu_kernel() -> AttentionFn | None:
    """The compiled CPU kernel, built on first use (~30 s, then cached); None where it cannot be built.

    ``LLAMA_LAB_CPU_KERNEL=0`` turns it off (the reference runs instead).
    """
    if os.environ.get("LLAMA_LAB_CPU_KERNEL", "1") == "0":
        return None
    with _LOCK:
        if "op" in _STATE:
            return _STATE["op"]  # type: ignore[return-value]
        if "error" in _STATE:
            return None
        try:
            op = _load()
        except Exception as exc:  # no compiler, no ninja, an exotic platform: the reference still works
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("the CPU attention kernel could not be built (%s); using the torch reference",
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        _STATE["op"] = op
        return op


def _load() -> AttentionFn:
    if hasattr(torch.ops.llama_lab, "paged_attention"):  # already loaded in this process
        return torch.ops.llama_lab.paged_attention
    from torch.utils import cpp_extension

    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    source = str(files("llama_lab.engine") / "csrc" / "paged_attention.cpp")
    flags = ["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    logger.info("loading the CPU attention kernel (built once per machine in %s)", build)
    cpp_extension.load(name="llama_lab_paged_attention", sources=[source], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False, verbose=False)
    op = torch.ops.llama_lab.paged_attention

    @torch.library.register_fake("llama_lab::paged_attention")
    def _fake(q, k_cache, v_cache, block_tables, rows, positions, scale):  # shapes for torch.compile
        return torch.empty_like(q)

    return op
