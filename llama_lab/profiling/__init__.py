"""The profiling room: numbers instead of ``watch nvidia-smi``.

``Monitor`` samples memory, CPU, GPU (NVML) and energy (RAPL / NVML) on a thread and marks
phases; ``readers`` holds the hardware readers it uses.
"""

from llama_lab.profiling.monitor import Monitor, Phase, Sample, WindowStats
from llama_lab.profiling.readers import (NvmlReader, RaplReader, cpu_kind, cpu_name, peak_rss_bytes,
                                         release_freed_memory, reset_peak_rss)

__all__ = ["Monitor", "NvmlReader", "Phase", "RaplReader", "Sample", "WindowStats", "cpu_kind", "cpu_name", "peak_rss_bytes",
           "release_freed_memory", "reset_peak_rss"]
