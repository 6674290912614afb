"""Attention over the paged KV cache: the CPU kernel where it builds, a torch reference everywhere else.

Both take the same arguments: ``q [N, H, D]``, one layer's ``k_cache`` / ``v_cache``
``[KV, num_blocks, block_size, D]`` (head-major), ``block_tables [S, max_blocks]`` (int32), and per query
token its ``rows`` (its sequence's row in the tables) and ``positions``; token ``t`` attends to
keys ``0..positions[t]`` of its sequence. That one rule covers decoding and chunked prefill.

The CPU kernel (``csrc/paged_attention.cpp``, built with the other CPU operators by ``cpu_ops``) is
compiled once per machine with the local C++ compiler and cached beside the converted models; the reference is plain torch (SDPA with a mask)
and is what CUDA and any other device run.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from llama_lab import kernels


logger = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]


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


def cpu_kernel() -> AttentionFn | None:
    """The compiled CPU kernel (``cpu_ops``, built on first use, then cached); None where it cannot be built.

    ``LLAMA_LAB_CPU_KERNEL=0`` turns it off (the reference runs instead).
    """
    if kernels.load() is not None:
        return None
    return torch.ops.llama_lab.paged_attention
