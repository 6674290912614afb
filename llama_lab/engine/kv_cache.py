"""The KV cache: fixed-size blocks allocated once per engine, handed to requests for their lifetime.

Each layer's keys and values live in one tensor ``[kv_heads, num_blocks, block_size, head_dim]``
(vLLM's paged blocks, head-major so one head's consecutive blocks are one contiguous stream): nothing
grows by concatenation, a finished request's blocks go straight to
the next one, and a token's attention reads only its own sequence's blocks. A request reserves
the blocks for its prompt plus its ``max_tokens`` when it is admitted, so a running request never
waits for memory; its leading blocks may be cached ones that already hold its prompt's first tokens
(``block_pool.py``). Block 0 is scratch: padding rows of a step write there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import torch

from llama_lab.engine.block_pool import BlockPool

logger = logging.getLogger(__name__)

SCRATCH_BLOCK = 0


@dataclasses.dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.block_size))


class PagedKVCache:
    """Per-layer K/V block tensors and the free list of blocks.

    On the CPU the tensors are left uninitialized (the kernel reads only written positions, and
    untouched pages cost no memory); elsewhere they start as zeros, because a masked attention
    still multiplies the masked values by zero and uninitialized memory may hold NaN.
    """

    def __init__(self, shape: CacheShape, num_blocks: int, device: torch.device, zero: bool,
                 prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is scratch)")
        self.shape, self.num_blocks, self.device = shape, num_blocks, device
        make = torch.zeros if zero else torch.empty
        size = (shape.kv_heads, num_blocks, shape.block_size, shape.head_dim)
        self.k = [make(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.v = [make(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.pool = BlockPool(num_blocks, shape.block_size, first=SCRATCH_BLOCK + 1, prefix_caching=prefix_caching)

    @property
    def capacity_tokens(self) -> int:
        """Tokens one request could hold if it had every block but the scratch one."""
        return (self.num_blocks - 1) * self.shape.block_size

    @property
    def free_blocks(self) -> int:
        return self.pool.free_blocks

    @property
    def touched_bytes(self) -> int:
        """Bytes of the blocks ever written, the scratch block included: what the cache costs in memory
        on a CPU, where untouched pages of the uninitialized tensors are never backed."""
        return (self.pool.touched_blocks + 1) * self.shape.block_size * self.shape.bytes_per_token

    def allocate(self, tokens: int, prefix: Sequence[int] = ()) -> tuple[list[int], int] | None:
        """Blocks for ``tokens`` tokens and how many tokens of ``prefix`` they already hold, or None
        if not enough are free right now."""
        return self.pool.allocate(tokens, prefix, copy=self._copy_tokens)

    def _copy_tokens(self, src: int, dst: int, n: int) -> None:
        """The keys and values of block ``src``'s first ``n`` tokens into block ``dst``, in every layer."""
        for cache in (*self.k, *self.v):
            cache[:, dst, :n].copy_(cache[:, src, :n])

    def publish(self, blocks: Sequence[int], tokens: Sequence[int]) -> None:
        self.pool.publish(blocks, tokens)

    def release(self, blocks: Sequence[int]) -> None:
        self.pool.release(blocks)

    def __repr__(self) -> str:
        gib = self.num_blocks * self.shape.block_size * self.shape.bytes_per_token / 2**30
        return (f"PagedKVCache({self.num_blocks} blocks x {self.shape.block_size} tokens = {self.capacity_tokens} tokens, "
                f"{gib:.2f} GiB, {self.free_blocks} free, {self.pool.cached_blocks} holding cached prefixes, {self.device})")


def plan_blocks(shape: CacheShape, device: torch.device, *, requested_tokens: int, max_batch_size: int,
                context_length: int) -> int:
    """How many blocks to allocate.

    ``requested_tokens`` > 0 is taken as given (at least one full context). Otherwise: room for
    every batch slot to use the whole context, capped on a GPU by 85% of its free memory and on
    the CPU by 30% of physical memory; never less than one full context.
    """
    one_context = shape.blocks_for(context_length) + 1
    if requested_tokens > 0:
        return max(one_context, shape.blocks_for(requested_tokens) + 1)
    wanted = shape.blocks_for(max_batch_size * context_length) + 1
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.85)
    else:
        import psutil

        budget = int(psutil.virtual_memory().total * 0.30)
    affordable = budget // (shape.block_size * shape.bytes_per_token)
    blocks = max(one_context, min(wanted, affordable))
    if blocks < wanted:
        logger.info("KV cache: %d tokens (memory-capped; %d would let every batch slot use the whole context)",
                    (blocks - 1) * shape.block_size, (wanted - 1) * shape.block_size)
    return blocks
