"""oneDNN-prepacked weights for the eager matrix products on a CPU.

``F.linear`` on a bf16 CPU tensor hands the weight to oneDNN in torch's plain layout, and oneDNN
re-lays it out on every call: the eager step then streams the weights at a fraction of the memory
bandwidth. Packing each weight once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
freezing does for its ATen path) and calling ``_linear_pointwise`` halves the time of the linears for
a few to a few dozen rows (measured on this CPU, SmolLM2's 30 layers: 8 rows 12.4 vs 25.4 ms, 16 rows
15.9 vs 29.0 ms; 512-row prompt chunks equal). It costs one more copy of the weights, so it is only
done when that copy fits comfortably in free memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)
# The packed copy may use at most this share of the memory available when it is made.
MAX_SHARE_OF_AVAILABLE = 0.25


def available() -> str | None:
    """None when this torch can pack bf16/fp32 linears for oneDNN, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch has no oneDNN linear packing ops"
    return None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack(modules: Iterable[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Packed weights for the plain CPU ``nn.Linear`` modules among ``modules`` (others are skipped).

    Returns {} (and logs why) when the packed copies would not fit, oneDNN lacks the ops or the dtype,
    or a packed product disagrees with ``F.linear``: the caller then keeps plain ``F.linear``.
    """
    linears = [m for m in dict.fromkeys(modules) if type(m) is nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype in PACKABLE_DTYPES]
    if not linears:
        return {}
    reason = available()
    if reason is None and torch.bfloat16 in {m.weight.dtype for m in linears} \
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        reason = "this CPU has no oneDNN bf16 support"
    if reason is None:
        import psutil

        need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        free = psutil.virtual_memory().available
        if need > MAX_SHARE_OF_AVAILABLE * free:
            reason = f"a packed copy ({need / 2**20:.0f} MiB) would take more than a quarter of free memory"
    if reason is not None:
        logger.info("eager CPU matrix products use torch's layout: %s", reason)
        return {}
    packed: dict[nn.Module, torch.Tensor] = {}
    with torch.inference_mode():
        for m in linears:
            packed[m] = torch.ops.mkldnn._reorder_linear_weight(m.weight, 1)
        probe = linears[0]
        # a private generator: building an engine must not move the caller's global torch RNG
        x = torch.randn(3, probe.in_features, generator=torch.Generator().manual_seed(0)).to(probe.weight.dtype)
        want, got = nn.functional.linear(x, probe.weight, probe.bias), linear(x, packed[probe], probe.bias)
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
            logger.warning("oneDNN's packed linear disagrees with F.linear here; not using it")
            return {}
    return packed
