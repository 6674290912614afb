"""Weight-only quantized linears for the CPU: 4-bit and 8-bit weights in groups of 32.

Two formats, the kernels' layouts (``csrc/quant_linear.cpp``):

- ``q4``: ``qs`` uint8 ``[N, K/2]`` (a group's 32 values in 16 bytes: element j in the low nibble of
  byte j, element j+16 in the high one, as GGUF's Q4_0 / Q4_1 blocks), ``d`` and ``m`` float16
  ``[N, K/32]``: ``w = d * q + m``. GGUF's Q4_0 (``m = -8 d``), Q4_1 and Q4_K (each 256-block's eight
  sub-blocks carry their own scale and minimum) all map onto it without loss beyond rounding the
  Q4_K sub-block scale ``d * sc`` to float16.
- ``q8``: ``qs`` int8 ``[N, K]``, ``d`` float16 ``[N, K/32]``: ``w = d * q``. GGUF's Q8_0 maps onto
  it exactly; every other GGUF type (Q5_*, Q6_K, Q2_K..Q3_K, IQ*) is dequantized by the ``gguf``
  package and quantized again to q8, whose error is well below the source's.

Activations are quantized per group inside the kernel, as llama.cpp does, but to int16 rather than int8
(the same instruction count per group with ``madd_epi16``, and an error of 1/32767 of the group's largest
value instead of 1/127), so a product costs the weight bytes plus integer arithmetic and answers like the
dequantized float weights. ``QuantLinear`` is an ordinary module (its forward takes
any leading dims), so the Hugging Face model it sits in still runs its own forward.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from llama_lab import kernels

logger = logging.getLogger(__name__)

GROUP = 32
KINDS = ("q4", "q8")


# Projections the engine multiplies as one matrix, per layer: (parent module, parts in row order, the
# stacked tensor's name in a packed file). Packed loads store them stacked so the fusion copies nothing.
STACKS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def require_kernels() -> None:
    """Build or load the CPU kernels; raises RuntimeError saying why when they cannot be had."""
    error = kernels.load()
    if error is not None:
        raise RuntimeError(f"the quantized CPU kernels are not available: {error}")


# From this many activation rows on, the kernels dequantize the weights and use a GEMM (a prompt chunk);
# below, integer dot products with int16 activations (decode).
GEMM_ROWS = 32


def gemm_dtype() -> str:
    """The precision of the kernels' GEMM for many rows: ``bf16`` where the CPU multiplies bf16 natively
    (AVX512-BF16, AMX), else ``fp32``; ``LLAMA_LAB_GEMM_DTYPE=fp32|bf16`` chooses, read once per process."""
    require_kernels()
    return torch.ops.llama_lab.gemm_dtype()


# ---------------------------------------------------------------- packing

def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 ``[N, K]`` -> ``[N, K/2]`` bytes, element j and j+16 of each group in one byte."""
    n, k = q.shape
    g = q.reshape(n, k // GROUP, 2, GROUP // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``."""
    n, half = qs.shape
    g = qs.reshape(n, half // (GROUP // 2), 1, GROUP // 2)
    return torch.cat([g & 0x0F, g >> 4], dim=2).reshape(n, half * 2)


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of 32 (absmax / 127), from any float weight ``[N, K]``."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    d = (g.abs().amax(-1) / 127.0).to(torch.float16)
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), d.contiguous()


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of 32 (min..max in 15 steps), from any float weight ``[N, K]``."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15.0).to(torch.float16)
    m = lo.to(torch.float16)
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(lo))
    q = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_nibbles(q.reshape(n, k)), d.contiguous(), m.contiguous()


def dequantize(kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight a packed one stands for (the tests' reference, and a fallback for other devices)."""
    if kind == "q8":
        n, k = qs.shape
        return (qs.float().reshape(n, k // GROUP, GROUP) * d.float()[..., None]).reshape(n, k)
    q = unpack_nibbles(qs).float()
    n, k = q.shape
    assert m is not None
    return (q.reshape(n, k // GROUP, GROUP) * d.float()[..., None] + m.float()[..., None]).reshape(n, k)


# ---------------------------------------------------------------- modules

class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` packed as q4 or q8; float32 in the kernel, the caller's dtype out."""

    def __init__(self, kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown quantized format {kind!r}")
        self.kind = kind
        self.out_features = qs.shape[0]
        self.in_features = qs.shape[1] * (2 if kind == "q4" else 1)
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)
        self.register_buffer("m", m if kind == "q4" else None)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> "QuantLinear":
        bias = linear.bias.detach().float() if linear.bias is not None else None
        if kind == "q8":
            return cls(kind, *quantize_q8(linear.weight), bias=bias)
        return cls(kind, *quantize_q4(linear.weight), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if self.kind == "q4":
            y = torch.ops.llama_lab.q4_linear(flat, self.qs, self.d, self.m)
        else:
            y = torch.ops.llama_lab.q8_linear(flat, self.qs, self.d)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_float(self) -> torch.Tensor:
        return dequantize(self.kind, self.qs, self.d, self.m)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """An embedding table kept packed: a lookup dequantizes only the rows it reads.

    With tied embeddings the table is the output head's weight, so both use the same buffers.
    """

    def __init__(self, table: QuantLinear) -> None:
        super().__init__()
        self.kind = table.kind
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # the same tensor objects as the table's: module walks (memory footprint, digests) count them once
        self.register_buffer("qs", table.qs)
        self.register_buffer("d", table.d)
        self.register_buffer("m", table.m)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.kind == "q4":
            rows = torch.ops.llama_lab.q4_rows(flat, self.qs, self.d, self.m)
        else:
            rows = torch.ops.llama_lab.q8_rows(flat, self.qs, self.d)
        return rows.reshape(*ids.shape, self.embedding_dim)


def fuse(modules: Sequence[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear for several of the same format and width (q/k/v, gate/up), or None.

    The originals are pointed at views of the fused buffers, so nothing is stored twice. Modules that
    already are consecutive row views of one tensor (a packed GGUF stores them stacked) are fused
    without a copy.
    """
    first = modules[0]
    if any(not isinstance(m, QuantLinear) or m.kind != first.kind or m.in_features != first.in_features
           for m in modules):
        return None
    qs = _stacked([m.qs for m in modules])
    d = _stacked([m.d for m in modules])
    mins = _stacked([m.m for m in modules]) if first.kind == "q4" else None
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])
    start = 0
    for m in modules:
        rows = slice(start, start + m.out_features)
        m.qs, m.d = qs[rows], d[rows]
        if mins is not None:
            m.m = mins[rows]
        if bias is not None and m.bias is not None:
            m.bias = bias[rows]
        start += m.out_features
    return QuantLinear(first.kind, qs, d, mins, bias)


def _stacked(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, or the tensor they already are consecutive row views of (no copy)."""
    first = parts[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    adjacent = all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:]
                   and p.untyped_storage().data_ptr() == storage.data_ptr() and p.storage_offset() == offset + sum(
                       q.numel() for q in parts[:i]) for i, p in enumerate(parts))
    if not adjacent:
        return torch.cat(list(parts))
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return first.new_empty(0).set_(storage, offset, shape)


def quantize_model(model: nn.Module, kind: str) -> int:
    """Quantize a Hugging Face causal LM in place for the CPU kernels; returns the linears replaced.

    The decoder's linears become ``kind``; the embedding table and the output head become q8 (as
    llama.cpp's Q4_K_M keeps them wider: they matter most for quality), one shared table when they
    are tied. Each float weight is freed as soon as its packed copy exists, so an 8B model loaded in
    bf16 never holds two copies. What stays float (norms, biases) becomes float32, the activations' dtype.
    """
    require_kernels()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    count = 0
    if embed is not None and embed.embedding_dim % GROUP == 0:
        table = QuantLinear("q8", *quantize_q8(embed.weight))
        model.set_input_embeddings(QuantEmbedding(table))
        if tied:
            model.set_output_embeddings(table)
            count += 1
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.in_features % GROUP == 0]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_linear(linear, "q8" if linear is head else kind))
        count += 1
    # the remaining float parameters (not ``model.to``: it would widen the packed float16 scales too)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return count


# ---------------------------------------------------------------- GGUF blocks

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)


def from_gguf_blocks(qtype_name: str, data: np.ndarray, shape: tuple[int, int]) -> QuantLinear | None:
    """A ``QuantLinear`` from a GGUF tensor's raw blocks (``data`` uint8 ``[N, bytes per row]``).

    Returns None for float types (the caller keeps those as floats). Q4_0, Q4_1, Q4_K and Q8_0 are
    repacked exactly; any other quantized type is dequantized with the ``gguf`` package and stored
    as q8.
    """
    n, k = shape
    if qtype_name in ("F32", "F16", "BF16"):
        return None
    if k % GROUP:
        raise ValueError(f"a {qtype_name} weight of width {k} is not a whole number of 32-element groups")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, -1)
    if qtype_name == "Q4_0":
        blocks = raw.reshape(n, k // 32, 18)
        d = _f16(blocks[..., 0:2]).reshape(n, k // 32)
        qs = blocks[..., 2:18].reshape(n, k // 2)
        return QuantLinear("q4", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()),
                           torch.from_numpy((d.astype(np.float32) * -8.0).astype(np.float16)))
    if qtype_name == "Q4_1":
        blocks = raw.reshape(n, k // 32, 20)
        d = _f16(blocks[..., 0:2]).reshape(n, k // 32)
        m = _f16(blocks[..., 2:4]).reshape(n, k // 32)
        qs = blocks[..., 4:20].reshape(n, k // 2)
        return QuantLinear("q4", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()), torch.from_numpy(m.copy()))
    if qtype_name == "Q8_0":
        blocks = raw.reshape(n, k // 32, 34)
        d = _f16(blocks[..., 0:2]).reshape(n, k // 32)
        qs = blocks[..., 2:34].reshape(n, k).view(np.int8)
        return QuantLinear("q8", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()))
    if qtype_name == "Q4_K":
        return _q4_k(raw, n, k)
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    weight = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    return QuantLinear("q8", *quantize_q8(weight))


def _q4_k(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q4_K: 256-element blocks (d, dmin float16; twelve bytes of 6-bit sub-block scales and minimums;
    128 bytes of nibbles) -> eight q4 groups of 32, each with scale ``d*sc`` and minimum ``-dmin*m``."""
    nb = k // 256
    blocks = raw.reshape(n, nb, 144)
    d = _f16(blocks[..., 0:2]).reshape(n, nb).astype(np.float32)
    dmin = _f16(blocks[..., 2:4]).reshape(n, nb).astype(np.float32)
    s = blocks[..., 4:16].astype(np.uint8)  # [n, nb, 12]
    sc = np.empty((n, nb, 8), dtype=np.uint8)
    mn = np.empty((n, nb, 8), dtype=np.uint8)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blocks[..., 16:144].reshape(n, nb, 4, 32)  # 4 chunks of 64 elements: low nibbles, then high
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)  # [n, nb, 4, 2, 32] in element order
    scale = (d[..., None] * sc).reshape(n, k // 32).astype(np.float16)
    minimum = (-dmin[..., None] * mn).reshape(n, k // 32).astype(np.float16)
    return QuantLinear("q4", pack_nibbles(torch.from_numpy(np.ascontiguousarray(q))), torch.from_numpy(scale),
                       torch.from_numpy(minimum))
