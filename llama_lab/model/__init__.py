"""The model room: loading every source and load mode, presets as data, chat templates and stop ids.

Nothing here knows about generation loops or HTTP.
"""

from llama_lab.model.loading import LoadedModel, LoadError, cache_root, converted_gguf_dir, embedded_gguf_path, load_model
from llama_lab.model.presets import ARCH_PRESETS, LoadMode

__all__ = ["ARCH_PRESETS", "LoadError", "LoadMode", "LoadedModel", "cache_root", "converted_gguf_dir",
           "embedded_gguf_path", "load_model"]
