"""Weight-only quantized linears for the CPU: 4-, 5- and 8-bit weights in groups of 32.

Three formats, the kernels' layouts (``csrc/quant_linear.cpp``):

- ``q4``: ``qs`` uint8 ``[N, K/2]`` (a group's 32 values in 16 bytes: element j in the low nibble of
  byte j, element j+16 in the high one, as GGUF's Q4_0 / Q4_1 blocks), ``d`` and ``m`` float16
  ``[N, K/32]``: ``w = d * q + m``. GGUF's Q4_0, Q4_1 and Q4_K (each 256-block's eight
  sub-blocks carry their own scale and minimum) all map onto it without loss beyond rounding the
  Q4_K sub-block scale ``d * sc`` to float16. Q4_0's minimum is ``-8 d``: it is not stored (``m`` is
  None), and the kernels compute it from ``d``.
- ``q5``: q4's ``qs``, ``d`` and ``m`` hold the low four bits, and ``qh`` uint8 ``[N, K/8]`` the fifth
  (a group's four bytes are one little-endian word, bit j for element j, as GGUF's Q5_0 / Q5_1 ``qh``):
  ``w = d * q + m`` with q in 0..31. Q5_0 (``m = -16 d``, not stored), Q5_1 and Q5_K map onto it as
  Q4_* map onto q4. 6 bits a weight where q8 takes 8.5: Q4_K_M files of models whose widths are not multiples of 256
  are mostly Q5_0 (llama.cpp's fallback for Q4_K), so this is what keeps them near their file size.
- ``q8``: ``qs`` int8 ``[N, K]``, ``d`` float16 ``[N, K/32]``: ``w = d * q``. GGUF's Q8_0 maps onto
  it exactly; every other GGUF type (Q6_K, Q2_K..Q3_K, IQ*) is dequantized by the ``gguf``
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
KINDS = ("q4", "q5", "q8")
MINS = ("q4", "q5")  # the kinds with a per-group minimum
# A q4/q5 weight stored without minimums (GGUF's Q4_0, Q5_0) has m = -offset * d: half its range, centred.
IMPLICIT_OFFSET = {"q4": 8.0, "q5": 16.0}


# Projections the engine multiplies as one matrix, per layer: (parent module, parts in row order, the
# stacked tensor's name in a packed file). Packed loads store them stacked so the fusion copies nothing.
STACKS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def require_kernels() -> None:
    """Build or load the CPU kernels; raises RuntimeError saying why when they cannot be had."""
    error = kernels.load()
    if error is not None:
        raise RuntimeError(f"the quantized CPU kernels are not available: {error}")


def gemm_dtype() -> str:
    """How the kernels multiply a prompt's many rows (``gemm_rows()`` and up): ``bf16`` (a bf16 GEMM) where the
    CPU multiplies bf16 natively (AVX512-BF16, AMX); ``int16`` (no GEMM: the int16 tiles, a single stream's
    precision) with AVX512-VNNI but no BF16; else ``fp32`` (the exact product).
    ``LLAMA_LAB_GEMM_DTYPE=fp32|bf16|int16`` chooses, read once per process."""
    require_kernels()
    return torch.ops.llama_lab.gemm_dtype()


def gemm_rows() -> int:
    """From this many activation rows on, the kernels dequantize the weights and use that GEMM (prompt chunks);
    below, tiles (decode): int16 activations, or for batches bf16 or int8 tiles where built (``batch_products``).
    32 with a bf16 GEMM, 128 with an fp32 one, which does not beat the tiles sooner."""
    require_kernels()
    return int(torch.ops.llama_lab.gemm_rows())


def bf16_tile_rows() -> int:
    """From this many activation rows up to ``gemm_rows()``, bf16 tiles where the GEMM's precision is bf16 and the
    CPU has AVX512-BF16 (each weight group dequantized in registers, the numbers of the bf16 GEMM); elsewhere
    ``gemm_rows()``: int16 tiles up to the GEMM."""
    require_kernels()
    return int(torch.ops.llama_lab.bf16_tile_rows())


def int8_tile_rows() -> int:
    """From this many activation rows up to ``gemm_rows()``, int8 tiles on AVX2 and AVX512 CPUs without the bf16
    tiles (the activations quantized to int8 per group of 32, as llama.cpp's Q8_0; with AVX512-VNNI one vpdpbusd
    per pair of groups; ``LLAMA_LAB_INT8_TILES=0`` turns them off); elsewhere ``gemm_rows()``."""
    require_kernels()
    return int(torch.ops.llama_lab.int8_tile_rows())


def batch_products() -> str:
    """How the kernels multiply a decode batch below the GEMM, by row count (``/health`` ``engine.batch_products``)."""
    def rows(first: int, last: int) -> str:
        return f"{first} row" if first == last == 1 else f"{first}-{last} rows"

    gemm = gemm_rows()
    for tiles, name in ((bf16_tile_rows(), "bf16"), (int8_tile_rows(), "int8")):
        if tiles < gemm:
            return f"int16 ({rows(1, tiles - 1)}), {name} ({rows(tiles, gemm - 1)})"
    return f"int16 ({rows(1, gemm - 1)})"


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


def pack_bits(high: torch.Tensor) -> torch.Tensor:
    """0/1 values ``[N, K]`` -> ``[N, K/8]`` bytes, bit j of a group's little-endian 32-bit word for element j."""
    n, k = high.shape
    bits = high.to(torch.uint8).reshape(n, k // 8, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8).contiguous()


def unpack_bits(qh: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_bits``."""
    n, b = qh.shape
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[..., None] >> shifts) & 1).reshape(n, b * 8)


def pack_q5(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 values 0..31 ``[N, K]`` -> (``qs`` the low nibbles as q4 packs them, ``qh`` the fifth bits)."""
    return pack_nibbles(q & 0x0F), pack_bits(q >> 4)


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of 32 (absmax / 127), from any float weight ``[N, K]``."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    d = (g.abs().amax(-1) / 127.0).to(torch.float16)
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), d.contiguous()


def _quantize_asymmetric(w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of 32, min..max in ``top`` steps: (q uint8 0..top ``[N, K]``, d, m float16 ``[N, K/32]``)."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / float(top)).to(torch.float16)
    m = lo.to(torch.float16)
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(lo))
    q = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp(0, top).to(torch.uint8)
    return q.reshape(n, k), d.contiguous(), m.contiguous()


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of 32 (min..max in 15 steps), from any float weight ``[N, K]``."""
    q, d, m = _quantize_asymmetric(w, 15)
    return pack_nibbles(q), d, m


def quantize_q5(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 5-bit per group of 32 (min..max in 31 steps): ``(qs, d, m, qh)``."""
    q, d, m = _quantize_asymmetric(w, 31)
    qs, qh = pack_q5(q)
    return qs, d, m, qh


def dequantize(kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
               qh: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight a packed one stands for (the tests' reference, and a fallback for other devices)."""
    if kind == "q8":
        n, k = qs.shape
        return (qs.float().reshape(n, k // GROUP, GROUP) * d.float()[..., None]).reshape(n, k)
    q = unpack_nibbles(qs).float()
    if kind == "q5":
        assert qh is not None
        q = q + 16 * unpack_bits(qh).float()
    n, k = q.shape
    groups = q.reshape(n, k // GROUP, GROUP)
    return (groups * d.float()[..., None] + minimums(kind, d, m).float()[..., None]).reshape(n, k)


def minimums(kind: str, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """A q4/q5 weight's per-group minimums: ``m``, or ``-offset * d`` where they are implicit (None)."""
    return m if m is not None else d.float() * -IMPLICIT_OFFSET[kind]


# ---------------------------------------------------------------- modules

class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` packed as q4, q5 or q8; float32 in the kernel, the caller's dtype out.

    A q4 or q5 weight's ``m`` may be None: its minimums are then ``-8 d`` / ``-16 d`` (GGUF's Q4_0, Q5_0).
    """

    def __init__(self, kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, qh: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown quantized format {kind!r}")
        self.kind = kind
        self.out_features = qs.shape[0]
        if kind == "q5" and qh is None:
            raise ValueError("a q5 weight needs its fifth bits (qh)")
        self.in_features = qs.shape[1] * (1 if kind == "q8" else 2)
        self.register_buffer("qs", qs)
        self.register_buffer("qh", qh if kind == "q5" else None)
        self.register_buffer("d", d)
        self.register_buffer("m", m if kind in MINS else None)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> "QuantLinear":
        bias = linear.bias.detach().float() if linear.bias is not None else None
        if kind == "q8":
            return cls(kind, *quantize_q8(linear.weight), bias=bias)
        if kind == "q5":
            qs, d, m, qh = quantize_q5(linear.weight)
            return cls(kind, qs, d, m, bias=bias, qh=qh)
        return cls(kind, *quantize_q4(linear.weight), bias=bias)

    def forward(self, x: torch.Tensor, prompt: bool = False) -> torch.Tensor:
        """``prompt``: the rows are a prompt's (the engine's prefill), which never take the int8 tiles."""
        flat = x.reshape(-1, self.in_features).float()
        if self.kind == "q4":
            y = torch.ops.llama_lab.q4_linear(flat, self.qs, self.d, self.m, prompt)
        elif self.kind == "q5":
            y = torch.ops.llama_lab.q5_linear(flat, self.qs, self.qh, self.d, self.m, prompt)
        else:
            y = torch.ops.llama_lab.q8_linear(flat, self.qs, self.d, prompt)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_float(self) -> torch.Tensor:
        return dequantize(self.kind, self.qs, self.d, self.m, self.qh)

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
        self.register_buffer("qh", table.qh)
        self.register_buffer("d", table.d)
        self.register_buffer("m", table.m)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.kind == "q4":
            rows = torch.ops.llama_lab.q4_rows(flat, self.qs, self.d, self.m)
        elif self.kind == "q5":
            rows = torch.ops.llama_lab.q5_rows(flat, self.qs, self.qh, self.d, self.m)
        else:
            rows = torch.ops.llama_lab.q8_rows(flat, self.qs, self.d)
        return rows.reshape(*ids.shape, self.embedding_dim)


def fusion_key(kind: str, has_mins: bool) -> tuple[str, bool]:
    """What the parts of one fused product share besides their width: the format, and minimums stored for
    all of them or for none (one kernel call takes one kind). A packed file's stacking uses it too."""
    return kind, has_mins


def can_fuse(a: QuantLinear, b: QuantLinear) -> bool:
    """Whether one product can take both: the same width and ``fusion_key``."""
    return a.in_features == b.in_features and fusion_key(a.kind, a.m is not None) == fusion_key(b.kind, b.m is not None)


def fuse(modules: Sequence[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear for several of the same format and width (q/k/v, gate/up), or None.

    The originals are pointed at views of the fused buffers, so nothing is stored twice. Modules that
    already are consecutive row views of one tensor (a packed GGUF stores them stacked) are fused
    without a copy. Stored and implicit minimums (Q4_1 beside Q4_0) are not fused: one product takes one.
    """
    first = modules[0]
    if any(not isinstance(m, QuantLinear) or not can_fuse(first, m) for m in modules):
        return None
    qs = _stacked([m.qs for m in modules])
    d = _stacked([m.d for m in modules])
    mins = _stacked([m.m for m in modules]) if first.m is not None else None
    highs = _stacked([m.qh for m in modules]) if first.kind == "q5" else None
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])
    start = 0
    for m in modules:
        rows = slice(start, start + m.out_features)
        m.qs, m.d = qs[rows], d[rows]
        if mins is not None:
            m.m = mins[rows]
        if highs is not None:
            m.qh = highs[rows]
        if bias is not None and m.bias is not None:
            m.bias = bias[rows]
        start += m.out_features
    return QuantLinear(first.kind, qs, d, mins, bias, qh=highs)


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

    Returns None for float types (the caller keeps those as floats). Q4_0, Q4_1, Q4_K, Q5_0, Q5_1,
    Q5_K and Q8_0 are repacked exactly; any other quantized type is dequantized with the ``gguf``
    package and stored as q8.
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
        return QuantLinear("q4", torch.from_numpy(qs.copy()), torch.from_numpy(d.copy()))  # m = -8 d, implicit
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
    if qtype_name in ("Q5_0", "Q5_1"):
        size = 22 if qtype_name == "Q5_0" else 24
        blocks = raw.reshape(n, k // 32, size)
        d = _f16(blocks[..., 0:2]).reshape(n, k // 32)
        if qtype_name == "Q5_0":
            m = None  # -16 d, implicit
            qh, qs = blocks[..., 2:6], blocks[..., 6:22]
        else:
            m = torch.from_numpy(_f16(blocks[..., 2:4]).reshape(n, k // 32).copy())
            qh, qs = blocks[..., 4:8], blocks[..., 8:24]
        return QuantLinear("q5", torch.from_numpy(qs.reshape(n, k // 2).copy()), torch.from_numpy(d.copy()), m,
                           qh=torch.from_numpy(qh.reshape(n, k // 8).copy()))
    if qtype_name == "Q5_K":
        return _q5_k(raw, n, k)
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    weight = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    return QuantLinear("q8", *quantize_q8(weight))


def _k_scales(blocks: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_K / Q5_K block's header (d, dmin float16; twelve bytes of 6-bit sub-block scales and minimums)
    as each group of 32's float16 scale ``d*sc`` and minimum ``-dmin*m``, ``[N, K/32]`` each."""
    nb = k // 256
    d = _f16(blocks[..., 0:2]).reshape(n, nb).astype(np.float32)
    dmin = _f16(blocks[..., 2:4]).reshape(n, nb).astype(np.float32)
    s = blocks[..., 4:16].astype(np.uint8)  # [n, nb, 12]
    sc = np.empty((n, nb, 8), dtype=np.uint8)
    mn = np.empty((n, nb, 8), dtype=np.uint8)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    scale = (d[..., None] * sc).reshape(n, k // 32).astype(np.float16)
    minimum = (-dmin[..., None] * mn).reshape(n, k // 32).astype(np.float16)
    return scale, minimum


def _q4_k(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q4_K: 256-element blocks (the header ``_k_scales`` reads; 128 bytes of nibbles) -> eight q4 groups
    of 32."""
    nb = k // 256
    blocks = raw.reshape(n, nb, 144)
    scale, minimum = _k_scales(blocks, n, k)
    qs = blocks[..., 16:144].reshape(n, nb, 4, 32)  # 4 chunks of 64 elements: low nibbles, then high
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)  # [n, nb, 4, 2, 32] in element order
    return QuantLinear("q4", pack_nibbles(torch.from_numpy(np.ascontiguousarray(q))), torch.from_numpy(scale),
                       torch.from_numpy(minimum))


def _q5_k(raw: np.ndarray, n: int, k: int) -> QuantLinear:
    """Q5_K: Q4_K's header, then 32 bytes of fifth bits (bit 2c of byte l for element 64c + l, bit 2c+1 for
    64c + 32 + l) and 128 bytes of nibbles as Q4_K's -> eight q5 groups of 32."""
    nb = k // 256
    blocks = raw.reshape(n, nb, 176)
    scale, minimum = _k_scales(blocks, n, k)
    qh = blocks[..., 16:48]  # [n, nb, 32]
    qs = blocks[..., 48:176].reshape(n, nb, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [n, nb, 4 chunks, 2 halves, 32]
    bit = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)  # chunk c, half h -> bit 2c + h
    high = (qh[:, :, None, None, :] >> bit) & 1
    q = (low | (high << 4)).reshape(n, k)
    qs_packed, qh_packed = pack_q5(torch.from_numpy(np.ascontiguousarray(q)))
    return QuantLinear("q5", qs_packed, torch.from_numpy(scale), torch.from_numpy(minimum), qh=qh_packed)
