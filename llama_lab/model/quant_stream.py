"""Build a model for the CPU kernels one weight at a time, so an 8B model in int4 fits in ~6 GB.

``quantize_model`` packs a model that is already loaded in bf16: an 8B model first takes 16 GB.
Here the model is built on the meta device and each weight is made (random weights) or read from
its safetensors shard in row chunks, packed, and its floats dropped before the next one is made:
the peak is the packed model plus one chunk of floats. A layer's q/k/v and gate/up projections are
packed into one stacked tensor each, whose row views the modules hold, so the engine's fusion of
them copies nothing (``quant.fuse``).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_lab.model.quant import GROUP, STACKS, QuantEmbedding, QuantLinear, quantize_q4, quantize_q8, require_kernels

# at most this many floats are materialized at once (64 MiB of float32)
CHUNK_ELEMENTS = 16 * 2**20

# A weight source: the float rows of one parameter, in chunks of whole rows, given its name and shape.
WeightSource = Callable[[str, tuple[int, ...]], Iterator[torch.Tensor]]


def random_weights(seed: int, std: float) -> WeightSource:
    """The initialization transformers gives a Llama: normal(0, std) matrices, ones for norms, zeros for biases.

    Each parameter draws from its own generator, seeded by ``seed`` and its name, so another
    process (the background compile) gets the same weights whatever order it builds them in.
    """
    def source(name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        if len(shape) == 1:
            yield torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)
            return
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        rows, cols = shape
        step = max(1, CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            yield torch.randn(min(step, rows - start), cols, generator=generator) * std
    return source


def safetensors_weights(directory: Path, model: nn.Module) -> WeightSource | None:
    """A checkpoint's tensors read from its safetensors shards in row chunks (memory-mapped), or None
    when the directory has no safetensors weights or does not name every parameter of ``model``."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        where = {name: directory / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    elif (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            where = dict.fromkeys(f.keys(), directory / "model.safetensors")
    else:
        return None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    needed = {n for n, _ in model.named_parameters() if not (tied and n == "lm_head.weight")}
    if not needed <= where.keys():
        return None

    def source(name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        if name not in where:
            raise KeyError(f"{directory} has no tensor {name!r}")
        with safe_open(str(where[name]), framework="pt") as f:
            part = f.get_slice(name)
            if tuple(part.get_shape()) != shape:
                raise ValueError(f"{name}: the checkpoint's shape {tuple(part.get_shape())} is not the config's {shape}")
            if len(shape) == 1:
                yield part[:].float()
                return
            step = max(1, CHUNK_ELEMENTS // shape[1])
            for start in range(0, shape[0], step):
                yield part[start:start + step].float()
    return source


def _pack(kind: str, chunks: Iterator[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Quantize row chunks and join them: the packed tensors of the whole matrix."""
    parts = [quantize_q8(c) if kind == "q8" else quantize_q4(c) for c in chunks]
    return tuple(torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(parts[0])))


def _whole(chunks: Iterator[torch.Tensor]) -> torch.Tensor:
    parts = list(chunks)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def build_quantized(model: nn.Module, kind: str, source: WeightSource) -> int:
    """Fill ``model`` (built on the meta device) with packed weights from ``source``; returns the
    linears packed. The same layout as ``quantize_model``: decoder linears ``kind``, the embedding
    table and the output head q8 (one shared table when tied), everything else float32."""
    require_kernels()
    config = model.config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    embed_name = names[id(embed)]
    if embed.embedding_dim % GROUP == 0:
        table = QuantLinear("q8", *_pack("q8", source(f"{embed_name}.weight", tuple(embed.weight.shape))))
        model.set_input_embeddings(QuantEmbedding(table))
        if tied:
            model.set_output_embeddings(table)
            count += 1
    else:
        embed.weight = nn.Parameter(_whole(source(f"{embed_name}.weight", tuple(embed.weight.shape))), requires_grad=False)
        if tied and head is not None:
            head.weight = embed.weight
    if not tied and type(head) is nn.Linear:  # first: its floats are the biggest, and memory is emptiest now
        head_name = names[id(head)]
        model.set_output_embeddings(QuantLinear("q8", *_pack("q8", source(f"{head_name}.weight", tuple(head.weight.shape)))))
        count += 1
    for i, layer in enumerate(model.model.layers):
        count += _build_layer(f"model.layers.{i}", layer, kind, source)
    # the rest (norms, biases of other modules) as float32; buffers computed at init (rotary) anew
    for module_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                full = f"{module_name}.{pname}" if module_name else pname
                module._parameters[pname] = nn.Parameter(_whole(source(full, tuple(param.shape))), requires_grad=False)
    decoder = model.model
    decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"no weights were made for {', '.join(left[:5])}")
    return count


def _build_layer(prefix: str, layer: nn.Module, kind: str, source: WeightSource) -> int:
    count = 0
    stacked: set[str] = set()
    for parent_name, parts, _ in STACKS:
        parent = getattr(layer, parent_name, None)
        linears = [getattr(parent, p, None) for p in parts] if parent is not None else []
        if not linears or not all(type(m) is nn.Linear and m.in_features % GROUP == 0 for m in linears):
            continue
        packed = [_pack(kind, source(f"{prefix}.{parent_name}.{p}.weight", tuple(m.weight.shape)))
                  for p, m in zip(parts, linears)]
        whole = [torch.cat([p[i] for p in packed]) for i in range(len(packed[0]))]
        del packed
        start = 0
        for p, m in zip(parts, linears):
            rows = slice(start, start + m.out_features)
            bias = _whole(source(f"{prefix}.{parent_name}.{p}.bias", (m.out_features,))) if m.bias is not None else None
            setattr(parent, p, QuantLinear(kind, *(t[rows] for t in whole), bias=bias))
            stacked.add(f"{parent_name}.{p}")
            start += m.out_features
            count += 1
    for name, module in list(layer.named_modules()):
        if type(module) is nn.Linear and name not in stacked and module.in_features % GROUP == 0:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            bias = _whole(source(f"{prefix}.{name}.bias", (module.out_features,))) if module.bias is not None else None
            setattr(parent, attr, QuantLinear(kind, *_pack(kind, source(f"{prefix}.{name}.weight",
                                                                        tuple(module.weight.shape))), bias=bias))
            count += 1
    return count


def meta_model(config: Any) -> nn.Module:
    """The model's modules with no storage behind them (built in no time, filled by ``build_quantized``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
