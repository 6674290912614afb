"""The Llama decoder as a few plain functions over the paged KV cache (gpt-fast's shape of code).

``FastLlama`` takes its weights from a loaded Hugging Face model without copying them twice: q/k/v
and gate/up are fused into one matrix each (one matrix product instead of three, and two), and
the Hugging Face modules are pointed at slices of the fused tensors, so both views share memory.
Where their formats differ (a Q4_K_M file's Q5_0 q and k beside a Q8_0 v), each run of neighbours
that share one is fused: q+k and v, so a mixed layer costs one product more, not three.
One forward handles any set of tokens: each token carries its position and its sequence's row in
the block table, which covers a decode step (one token per sequence) and a prefill chunk alike.

``decode`` is the function ``torch.compile`` sees (fixed code path, dynamic token count);
``prefill`` runs eagerly with a cancel check between layers, so a client that leaves during a
long prompt frees the machine within one layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from llama_lab.engine import cpu_linear
from llama_lab.engine.attention import AttentionFn, reference_attention, reference_prefill
from llama_lab.model.quant import QuantEmbedding, QuantLinear, fusion_key
from llama_lab.model.quant import fuse as fuse_quantized

logger = logging.getLogger(__name__)

# Architectures whose decoder layer is Llama's: attention q/k/v/o, gated MLP, two RMSNorms.
SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}
STATIC_ROPE = {"default", "llama3", "linear"}


class PrefillCancelled(Exception):
    """Raised between layers when every sequence of a prefill chunk was cancelled."""


def unsupported_reason(model: Any) -> str | None:
    """Why ``FastLlama`` cannot run this model (None when it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"architecture {kind!r} is not one of {sorted(SUPPORTED_TYPES)}"
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not layers or not hasattr(model, "lm_head"):
        return "the model has no decoder layers / lm_head where a Llama has them"
    attn = layers[0].self_attn
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return "per-head q/k norms are not supported"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < getattr(config, "max_position_embeddings", 0):
        return f"sliding-window attention ({window}) is not supported"
    rope = getattr(getattr(decoder, "rotary_emb", None), "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} (length-dependent) is not supported"
    return None


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _traceable(module: nn.Module) -> bool:
    """A linear the compiler can trace: plain, or packed for the CPU kernels (custom ops with shapes)."""
    return type(module) in (nn.Linear, QuantLinear)


def _fuse(modules: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears; the originals become views of it (no second copy)."""
    weight = torch.cat([m.weight.data for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.data if m.bias is not None else torch.zeros(m.out_features, dtype=weight.dtype,
                                                                              device=weight.device) for m in modules])
    start = 0
    for m in modules:
        m.weight.data = weight[start:start + m.out_features]
        if m.bias is not None and bias is not None:
            m.bias.data = bias[start:start + m.out_features]
        start += m.out_features
    return weight, bias


def _fusion_key(module: nn.Module) -> tuple[Any, ...]:
    """Neighbours with equal keys are one matrix product: plain linears of one width, dtype and device, or
    packed ones of one width and ``fusion_key``; any other module (bitsandbytes) stands alone."""
    if _is_plain_linear(module):
        return "plain", module.in_features, module.weight.dtype, module.weight.device
    if isinstance(module, QuantLinear):
        return "packed", module.in_features, *fusion_key(module.kind, module.m is not None)
    return "alone", id(module)


def _fused_runs(modules: Sequence[nn.Module]) -> tuple[nn.ModuleList, list[list[int]]]:
    """The modules as runs of fusable neighbours, each run one module (fused where it has several), and
    each run's output widths: q/k/v of one format become one product, a mixed layer's q+k and v two."""
    runs = [list(group) for _, group in itertools.groupby(modules, key=_fusion_key)]
    fused = []
    for run in runs:
        if len(run) == 1:
            fused.append(run[0])
        elif _is_plain_linear(run[0]):
            fused.append(_linear(*_fuse(run)))
        else:
            fused.append(fuse_quantized(run))
    return nn.ModuleList(fused), [[m.out_features for m in run] for run in runs]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` around existing tensors (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


@dataclasses.dataclass
class Step:
    """The tensors of one forward: per token its id, position, sequence row and cache slot."""

    tokens: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    rows: torch.Tensor  # [N] long: row in block_tables
    blocks: torch.Tensor  # [N] long: cache block the token's k/v go to
    offsets: torch.Tensor  # [N] long: position inside that block
    block_tables: torch.Tensor  # [S, max_blocks] int32
    logit_rows: torch.Tensor  # [R] long: tokens whose next-token logits are wanted

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in order, as they are (``dataclasses.astuple`` would deep-copy them)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


class FastLlama(nn.Module):
    """A Llama-family decoder over a paged KV cache; weights shared with the Hugging Face model."""

    def __init__(self, hf_model: Any, attention: AttentionFn | None) -> None:
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason:
            raise ValueError(reason)
        config = hf_model.config
        decoder = hf_model.model
        hf_model.requires_grad_(False)  # inference only; frozen weights are what torch.compile packs
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.kernel = attention  # the CPU kernel, or None for the torch reference
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act]
        embed = decoder.embed_tokens
        # a packed table is read row by row by its own op; a float one is indexed
        self.embed_table = embed if isinstance(embed, QuantEmbedding) else None
        self.embed = None if self.embed_table is not None else embed.weight
        self.norm = decoder.norm.weight
        self.dtype = self.norm.dtype  # activations, rotary cos/sin and the KV cache
        self.lm_head = hf_model.lm_head
        # bitsandbytes (or other) layers that torch.compile does not trace: the step then runs eagerly
        self.quantized = False
        self.packed_weights = False  # linears packed for the CPU kernels (model/quant.py)
        # oneDNN-packed copies of the linears' weights, for eager steps on a CPU (see cpu_linear.py);
        # empty unless ``pack_cpu_linears`` filled it. The compiled step never uses them.
        self.packed: dict[nn.Module, torch.Tensor] = {}
        self.layers = nn.ModuleList()
        for hf_layer in decoder.layers:
            attn, mlp = hf_layer.self_attn, hf_layer.mlp
            layer = nn.Module()
            layer.ln1, layer.ln2 = hf_layer.input_layernorm.weight, hf_layer.post_attention_layernorm.weight
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj, attn.o_proj, mlp.down_proj)
            # one module per run of same-format neighbours, and the widths its output splits into
            layer.qkv, layer.qkv_widths = _fused_runs([attn.q_proj, attn.k_proj, attn.v_proj])
            layer.gate_up, layer.gate_up_widths = _fused_runs([mlp.gate_proj, mlp.up_proj])
            if not all(_traceable(m) for m in projections):
                self.quantized = True
            if any(isinstance(m, QuantLinear) for m in projections):
                self.packed_weights = True
            layer.o, layer.down = attn.o_proj, mlp.down_proj
            self.layers.append(layer)
        rotary = decoder.rotary_emb
        # the rotary angles' frequencies (rope scaling such as Llama 3's is already in them); cos and sin are
        # computed per step for the step's positions (``_rotary``), as the Hugging Face model does, rather
        # than kept as tables for the whole context: those took 4 MiB for SmolLM2's 8k positions and 128 MiB
        # for a 128k-context Llama 3.1, more than the KV cache a short conversation writes
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def pack_cpu_linears(self) -> int:
        """Pack the plain linears' weights for oneDNN (eager CPU steps); returns how many were packed.
        ``cpu_linear.pack`` keeps only plain CPU ``nn.Linear`` modules (not bitsandbytes layers)."""
        self.packed = cpu_linear.pack(self.modules())
        return len(self.packed)

    # ---------------------------------------------------------------- the math

    def _lin(self, module: nn.Module, x: torch.Tensor, prompt: bool = False) -> torch.Tensor:
        """``prompt``: the rows are a prompt's, which the quantized kernels never multiply in int8 (``QuantLinear``)."""
        if not torch.compiler.is_compiling() and self.packed:
            packed = self.packed.get(module)
            if packed is not None:
                return cpu_linear.linear(x, packed, module.bias)
        return module(x, prompt) if isinstance(module, QuantLinear) else module(x)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Hugging Face's LlamaRMSNorm, step for step, so eager and fast paths round alike.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _runs(self, modules: nn.ModuleList, widths: list[list[int]], h: torch.Tensor,
              prompt: bool) -> list[torch.Tensor]:
        """The outputs of fused runs (``_fused_runs``), split back into one tensor per projection."""
        return [part for module, sizes in zip(modules, widths)
                for part in self._lin(module, h, prompt).split(sizes, dim=-1)]

    def _qkv(self, layer: nn.Module, h: torch.Tensor, prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        q, k, v = self._runs(layer.qkv, layer.qkv_widths, h, prompt)
        return (q.reshape(n, self.num_heads, self.head_dim), k.reshape(n, self.num_kv_heads, self.head_dim),
                v.reshape(n, self.num_kv_heads, self.head_dim))

    def _mlp(self, layer: nn.Module, h: torch.Tensor, prompt: bool) -> torch.Tensor:
        gate, up = self._runs(layer.gate_up, layer.gate_up_widths, h, prompt)
        return self._lin(layer.down, self.act(gate) * up, prompt)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotary angles at ``positions``, [N, 1, head_dim] in the activations' dtype."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        return cos.to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _layer(self, i: int, x: torch.Tensor, step: Step, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, attend: Callable[..., torch.Tensor],
               prompt: bool = False) -> torch.Tensor:
        layer = self.layers[i]
        h = self._rms(x, layer.ln1)
        q, k, v = self._qkv(layer, h, prompt)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        kv = k_cache.dtype  # may be narrower than the activations (a 16-bit cache for fp32 activations)
        k_cache[:, step.blocks, step.offsets] = k.transpose(0, 1).to(kv)  # cache: [KV, blocks, block_size, D]
        v_cache[:, step.blocks, step.offsets] = v.transpose(0, 1).to(kv)
        att = attend(q.to(kv), k_cache, v_cache).to(x.dtype)
        x = x + self._lin(layer.o, att.reshape(x.shape[0], self.num_heads * self.head_dim), prompt)
        return x + self._mlp(layer, self._rms(x, layer.ln2), prompt)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embed_table is not None:
            return self.embed_table(tokens).to(self.dtype)
        return self.embed[tokens]

    def _logits(self, x: torch.Tensor, rows: torch.Tensor, prompt: bool = False) -> torch.Tensor:
        return self._lin(self.lm_head, self._rms(x[rows], self.norm), prompt).float()

    # ---------------------------------------------------------------- entry points

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor,
                offsets: torch.Tensor, block_tables: torch.Tensor, logit_rows: torch.Tensor,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        """One decode step (any token count): the function ``torch.compile`` sees."""
        step = Step(tokens, positions, rows, blocks, offsets, block_tables, logit_rows)
        x = self._embed(tokens)
        cos, sin = self._rotary(positions)
        kernel = self.kernel

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            if kernel is not None:
                return kernel(q.contiguous(), kc, vc, block_tables, rows, positions, self.scale)
            return reference_attention(q, kc, vc, block_tables, rows, positions, self.scale)

        for i in range(len(self.layers)):
            x = self._layer(i, x, step, cos, sin, k_caches[i], v_caches[i], attend)
        return self._logits(x, logit_rows)

    def prefill(self, step: Step, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                segments: Sequence[tuple[int, int, int, int]], cancelled: Callable[[], bool]) -> torch.Tensor:
        """Prompt chunks of one or more sequences, eagerly; ``segments`` lists (row, start, count,
        first_position) per sequence for the reference attention. Raises ``PrefillCancelled``."""
        x = self._embed(step.tokens)
        cos, sin = self._rotary(step.positions)
        kernel = self.kernel

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            if kernel is not None:
                return kernel(q.contiguous(), kc, vc, step.block_tables, step.rows, step.positions, self.scale)
            parts = [reference_prefill(q[start:start + count], kc, vc, step.block_tables[row], first, self.scale)
                     for row, start, count, first in segments]
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        for i in range(len(self.layers)):
            if cancelled():
                raise PrefillCancelled
            x = self._layer(i, x, step, cos, sin, k_caches[i], v_caches[i], attend, prompt=True)
        return self._logits(x, step.logit_rows, prompt=True)
