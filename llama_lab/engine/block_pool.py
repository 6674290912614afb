"""Which KV-cache blocks are free, in use, or hold a known prefix (prefix caching).

A chat client sends the whole conversation again every turn, and every request of an app starts
with the same system prompt. So a block filled entirely with tokens is named by a digest of its
tokens and of every token before them in the sequence (a chain, as in vLLM), and a later request
whose prompt starts with the same tokens reuses the block instead of computing it again. A full
block is never written again, so several sequences can read it at once; a released block that
holds a named prefix stays cached until a request needs the room (least recently used first).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

_ROOT = b"llama_lab-prefix"


def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockPool:
    """Block bookkeeping for one KV cache: reference counts, named prefixes, the free list."""

    def __init__(self, num_blocks: int, block_size: int, *, first: int = 1, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # LIFO: a released block is the next one handed out, so reused pages are already resident.
        self._free = list(range(num_blocks - 1, first - 1, -1))
        self._refs: dict[int, int] = {}
        self._named: dict[bytes, int] = {}  # digest of a full block's prefix -> the block
        self._name_of: dict[int, bytes] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # named, unused: evictable, oldest first
        self._first = first
        self._highest = first - 1  # the highest block ever handed out: the LIFO list hands them out in order

    @property
    def free_blocks(self) -> int:
        """Blocks a request could get now (cached prefixes nobody uses count: they are given up on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def touched_blocks(self) -> int:
        """Blocks ever written: on a CPU, the uninitialized cache's pages that cost memory."""
        return self._highest - self._first + 1

    @property
    def cached_blocks(self) -> int:
        return len(self._named)

    def _match(self, prefix: Sequence[int]) -> list[int]:
        blocks: list[int] = []
        digest = _ROOT
        bs = self.block_size
        for start in range(0, len(prefix) - bs + 1, bs):
            digest = _chain(digest, prefix[start:start + bs])
            block = self._named.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, tokens: int, prefix: Sequence[int] = ()) -> tuple[list[int], int] | None:
        """Blocks for ``tokens`` tokens and how many of them are already computed, or None if there is no room.

        The leading blocks are cached ones whose tokens start ``prefix`` (whole blocks only).
        """
        matched = self._match(prefix) if self.prefix_caching else []
        need = max(1, -(-tokens // self.block_size)) - len(matched)
        if need > len(self._free) + len(self._idle) - sum(1 for b in matched if b in self._idle):
            return None
        for block in matched:
            self._refs[block] = self._refs.get(block, 0) + 1
            self._idle.pop(block, None)
        fresh = []
        for _ in range(max(0, need)):
            if self._free:
                block = self._free.pop()
                self._highest = max(self._highest, block)
            else:  # give up the least recently used cached prefix
                block, _ = self._idle.popitem(last=False)
                del self._named[self._name_of.pop(block)]
            self._refs[block] = 1
            fresh.append(block)
        return matched + fresh, len(matched) * self.block_size

    def publish(self, blocks: Sequence[int], tokens: Sequence[int]) -> None:
        """Name the blocks that ``tokens`` (the sequence's computed tokens, from position 0) fill entirely."""
        if not self.prefix_caching:
            return
        digest = _ROOT
        bs = self.block_size
        for i, start in enumerate(range(0, min(len(tokens), len(blocks) * bs) - bs + 1, bs)):
            digest = _chain(digest, tokens[start:start + bs])
            block = blocks[i]
            if block in self._name_of or digest in self._named:
                continue  # matched from the cache (named already), or another block holds this prefix: stays private
            self._named[digest] = block
            self._name_of[block] = digest

    def release(self, blocks: Sequence[int]) -> None:
        for block in reversed(blocks):
            if block not in self._refs:  # not handed out (the scratch block, a second release): nothing to give back
                continue
            refs = self._refs[block] - 1
            if refs > 0:
                self._refs[block] = refs
                continue
            self._refs.pop(block, None)
            if block in self._name_of:
                self._idle[block] = None
                self._idle.move_to_end(block)
            else:
                self._free.append(block)
