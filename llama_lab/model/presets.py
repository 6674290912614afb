"""Named load modes and architecture presets, kept as data (gpt-fast's ``transformer_configs``)."""

from __future__ import annotations

import enum
from typing import Any


class LoadMode(str, enum.Enum):
    """How weights are placed and stored: the four classic rows (full, 8-bit, 4-bit, CPU only), the CPU's
    weight-only quantized kernels, and ``auto``, which picks one of them for the source and device."""

    AUTO = "auto"  # a GGUF on the CPU: gguf; anything else: full
    FULL = "full"  # bf16/fp16 on the GPU; on CPU bf16 where fast, else fp32
    INT8 = "8bit"  # bitsandbytes LLM.int8
    NF4 = "4bit"  # bitsandbytes NF4 with double quantization
    CPU = "cpu"  # force the CPU even when a GPU is present (a GGUF keeps its quantization there)
    GGUF = "gguf"  # a GGUF file's own quantized blocks, repacked for the CPU kernels (model/gguf_native.py)
    Q8 = "int8"  # weight-only int8 in groups of 32, CPU kernels (model/quant.py)
    Q4 = "int4"  # weight-only 4-bit in groups of 32, CPU kernels

    @classmethod
    def parse(cls, value: "str | LoadMode") -> "LoadMode":
        if isinstance(value, LoadMode):
            return value
        aliases = {"8-bit": "8bit", "4-bit": "4bit", "nf4": "4bit", "only_cpu": "cpu", "q8": "int8", "q4": "int4"}
        key = aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(key)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown load mode {value!r}; choose one of: {choices}") from None

    @property
    def bits(self) -> int | None:
        """Bits per bitsandbytes-quantized linear weight, or None when bitsandbytes is not used."""
        return {LoadMode.INT8: 8, LoadMode.NF4: 4}.get(self)

    @property
    def cpu_kernel_format(self) -> str | None:
        """The CPU kernels' format (``q8`` / ``q4``) this mode quantizes floats to, or None."""
        return {LoadMode.Q8: "q8", LoadMode.Q4: "q4"}.get(self)

    @property
    def cpu_only(self) -> bool:
        """Whether this mode runs on the CPU whatever GPUs the machine has (``cpu`` and the CPU kernels' modes)."""
        return self in (LoadMode.CPU, LoadMode.GGUF, LoadMode.Q8, LoadMode.Q4)


# Architecture presets for random-weight models: real shapes, no download. Values follow the
# published config.json of each model; vocab_size None means "use the tokenizer's size".
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, vocab_size=None, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, vocab_size=None, tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128256, tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}

RANDOM_PREFIX = "random:"
