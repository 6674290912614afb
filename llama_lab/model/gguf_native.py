"""GGUF files kept in their own quantization: repacked once into the CPU kernels' layout, then loaded.

A GGUF's quantized blocks already are what a weight-only kernel wants, so they are never widened to
floats for the matrix products: Q4_0 / Q4_1 / Q4_K become ``q4``, Q5_0 / Q5_1 / Q5_K become ``q5``,
Q8_0 becomes ``q8`` (exactly; see ``model/quant.py``), other quantized types are re-quantized to ``q8``,
and float tensors (norms, biases) stay floats. The first load of a file writes the packed tensors (safetensors), the config,
the tokenizer and the generation config into the cache dir, published with an atomic rename; every
later load reads that copy.

For the ``llama`` architecture, llama.cpp stores the q and k projections with their rows permuted for
its rotary layout; they are put back in Hugging Face's order (the permutation ``transformers`` applies
when it reads a GGUF), by moving whole packed rows.

A layer's q/k/v projections, and its gate/up projections, are stored stacked in one tensor each when
they share a format (where they do not, each run of neighbours that does: a Q4_K_M's q+k), which is
how the engine multiplies them (one product instead of three). The
loaded modules are row views of that tensor, so the engine's fusion finds them adjacent and copies
nothing: the weights stay in the file's memory map, in memory once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llama_lab.cache import MARKER, cache_root, is_complete, published_dir
from llama_lab.model.quant import (STACKS, QuantEmbedding, QuantLinear, from_gguf_blocks, fusion_key,
                                   require_kernels)

logger = logging.getLogger(__name__)

PACK_FORMAT = 5  # bump when the packed layout changes
SUPPORTED_ARCHS = {"llama", "mistral", "qwen2"}

PARTS = ("qs", "qh", "d", "m")  # a packed weight's tensors (``model/quant.py``); qh only for q5; m for q4/q5
# whose minimums are stored (not Q4_0's or Q5_0's)
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter a GGUF tensor holds, or None for tensors the model does not use."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def hf_row_order(rows: int, heads: int) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation (``transformers``' ``_reverse_permute_weights``)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def packed_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{PACK_FORMAT}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}-packed"


def file_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (``{"Q4_1": 210, "F32": 61, ...}``)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(gguf).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ---------------------------------------------------------------- the one-time repack

def ensure_packed(gguf: Path) -> Path:
    """The packed copy of ``gguf`` in the cache, written first if needed (atomically)."""
    target = packed_dir(gguf)
    if is_complete(target):
        return target

    logger.info("repacking %s for the CPU kernels (one time)", gguf.name)
    with _one_reader(gguf) as reader:
        return _repack(gguf, target, reader)


@contextlib.contextmanager
def _one_reader(gguf: Path) -> Iterator[Any]:
    """One parse of the file for the whole repack.

    transformers opens the file with ``gguf.GGUFReader`` again for the config and again for the
    tokenizer, and a reader's construction parses every metadata field (49k vocabulary strings and their
    merges for SmolLM2: 3-4 s each on 2 cores, most of a first start's repack). A reader is read-only
    once built, so within this block every reader of this file is the same one. transformers imports
    the class at call time, which is what makes the swap reach it; other files get a fresh reader.
    """
    import gguf as gguf_package

    original = gguf_package.GGUFReader
    reader = original(gguf)
    path = gguf.resolve()

    def shared(source: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and Path(source).resolve() == path:
            return reader
        return original(source, *args, **kwargs)

    gguf_package.GGUFReader = shared
    try:
        yield reader
    finally:
        gguf_package.GGUFReader = original


def _repack(gguf: Path, target: Path, reader: Any) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(config, "model_type", None) not in SUPPORTED_ARCHS:
        raise ValueError(f"{gguf.name}: architecture {config.model_type!r} cannot be kept quantized "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))}); load it with mode 'full'")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads

    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    source_types: dict[str, str] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        qtype = t.tensor_type.name
        source_types[name] = qtype
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists the fastest dimension first
        data = np.asarray(t.data)
        order = None
        if config.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            order = hf_row_order(shape[0], heads if ".q_proj." in name else kv_heads)
        if len(shape) == 2 and (packed := from_gguf_blocks(qtype, data.reshape(shape[0], -1), shape)) is not None:
            base = name.removesuffix(".weight")
            kinds[base] = packed.kind
            for part in PARTS:
                value = getattr(packed, part)
                if value is not None:
                    tensors[f"{base}.{part}"] = (value[torch.from_numpy(order)] if order is not None else value).contiguous()
        else:
            value = torch.from_numpy(_floats(t, qtype).reshape(shape).copy())
            tensors[name] = (value[torch.from_numpy(order)] if order is not None else value).contiguous()

    stacks = _stack(tensors, kinds, config.num_hidden_layers)
    with published_dir(target) as tmp:
        save_file(tensors, str(tmp / "packed.safetensors"),
                  metadata={"kinds": json.dumps(kinds), "stacks": json.dumps(stacks)})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "format": PACK_FORMAT, "types": source_types}))
    return target


def _stack(tensors: dict[str, torch.Tensor], kinds: dict[str, str], layers: int) -> dict[str, list[list[Any]]]:
    """Replace each layer's q/k/v (and gate/up) packed tensors by stacked ones, in place: each run of
    neighbours that one product can take (one format; minimums stored for all or for none) becomes one tensor,
    as the engine fuses them (a Q4_K_M's Q5_0 q and k stacked, its Q8_0 v apart), so its fusion finds views
    and copies nothing. Returns ``{stacked base: [[part base, rows], ...]}``, in row order."""
    stacks: dict[str, list[list[Any]]] = {}
    for i in range(layers):
        for parent, parts, stacked in STACKS:
            bases = [f"model.layers.{i}.{parent}.{part}" for part in parts]
            if any(kinds.get(b) is None for b in bases):
                continue  # a float projection: not packed
            for _, group in itertools.groupby(range(len(bases)),
                                              key=lambda j: fusion_key(kinds[bases[j]], f"{bases[j]}.m" in tensors)):
                run = list(group)
                if len(run) < 2:
                    continue
                members = [bases[j] for j in run]
                name = stacked if len(run) == len(parts) else \
                    "_".join(parts[j].removesuffix("_proj") for j in run) + "_proj"  # q_k_proj
                target = f"model.layers.{i}.{parent}.{name}"
                stacks[target] = [[b, int(tensors[f"{b}.qs"].shape[0])] for b in members]
                for part in PARTS:
                    if f"{members[0]}.{part}" in tensors:
                        tensors[f"{target}.{part}"] = torch.cat([tensors.pop(f"{b}.{part}") for b in members])
                kinds[target] = kinds[members[0]]
                for b in members:
                    del kinds[b]
    return stacks


def _floats(tensor: Any, qtype: str) -> np.ndarray:
    if qtype == "F32":
        return np.asarray(tensor.data, dtype=np.float32)
    if qtype == "F16":
        return np.asarray(tensor.data).view(np.float16).astype(np.float32)
    import gguf

    return gguf.quants.dequantize(np.asarray(tensor.data), gguf.GGMLQuantizationType[qtype]).astype(np.float32)


# ---------------------------------------------------------------- loading the packed copy

def load_packed(directory: Path) -> tuple[nn.Module, Any]:
    """The model (float32 activations, packed linears and embedding) and tokenizer of a packed copy."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    require_kernels()
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with safe_open(str(directory / "packed.safetensors"), framework="pt") as f:  # memory-mapped, not copied
        metadata = f.metadata()
        kinds: dict[str, str] = json.loads(metadata["kinds"])
        stacks: dict[str, list[list[Any]]] = json.loads(metadata.get("stacks", "{}"))
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parts = {part for members in stacks.values() for part, _ in members}
    for base, kind in kinds.items():
        if base in stacks:  # each projection is a view of its rows in the stacked tensor
            start = 0
            for part, rows in stacks[base]:
                view = [tensors[f"{base}.{x}"][start:start + rows] if f"{base}.{x}" in tensors else None
                        for x in PARTS]
                _set_module(model, part, QuantLinear(kind, view[0], view[2], view[3], tensors.get(f"{part}.bias"),
                                                     qh=view[1]))
                start += rows
            continue
        bias = tensors.get(f"{base}.bias")
        linear = QuantLinear(kind, tensors[f"{base}.qs"], tensors[f"{base}.d"], tensors.get(f"{base}.m"), bias,
                             qh=tensors.get(f"{base}.qh"))
        if base == "model.embed_tokens":
            model.model.embed_tokens = QuantEmbedding(linear)
            if "lm_head" not in kinds and config.tie_word_embeddings:
                model.lm_head = linear  # the same buffers: stored and read once
        else:
            _set_module(model, base, linear)
    for name, value in tensors.items():
        base, _, part = name.rpartition(".")
        if base in kinds or base in parts:
            continue
        module = model.get_submodule(base)
        module._parameters[part] = nn.Parameter(value, requires_grad=False)
    if "lm_head" not in kinds and not config.tie_word_embeddings:
        raise ValueError(f"{directory}: the file has no output weight and does not tie it to the embedding")
    decoder = model.model
    decoder.rotary_emb = type(decoder.rotary_emb)(config=config)  # built on the meta device: make it real
    model.generation_config = GenerationConfig.from_pretrained(directory)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"{directory}: the file has no tensor for {', '.join(left[:5])}")
    model.requires_grad_(False)
    return model.eval(), tokenizer


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
