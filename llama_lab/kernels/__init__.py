"""The C++ CPU operators (paged attention, quantized linears), built once per machine: see ``build``."""

from llama_lab.kernels.build import cpu_flags, load

__all__ = ["cpu_flags", "load"]
