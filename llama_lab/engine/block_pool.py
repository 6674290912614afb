"""Which KV-cache blocks are free, in use, or hold a known prefix (prefix caching).

A chat client sends the whole conversation again every turn, and every request of an app starts
with the same system prompt. So a block filled entirely with tokens is named by a digest of its
tokens and of every token before them in the sequence (a chain, as in vLLM), and a later request
whose prompt starts with the same tokens reuses the block instead of computing it again. A full
block is never written again, so several sequences can read it at once; a released block that
holds a named prefix stays cached until a request needs the room (least recently used first).

Past the whole blocks, a prompt may share the first tokens of a cached block (a resent prompt, a chat's
regenerated answer: the block holding the prompt's tail also holds the old answer's first tokens). Those
tokens are copied into the request's own block by the ``copy`` the caller passes, so at most the prompt's
last token is computed again, as llama.cpp's slots do, where whole blocks alone recomputed up to 15.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Callable, Sequence

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
        # (digest of the prefix before a named block, its first token) -> {block: its tokens}: where a partial
        # match looks (keyed by the first token too, so a system prompt followed by thousands of conversations
        # is not scanned whole on every request)
        self._children: dict[tuple[bytes, int], dict[int, tuple[int, ...]]] = {}
        self._parent_of: dict[int, tuple[bytes, int]] = {}
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

    def _match(self, prefix: Sequence[int]) -> tuple[list[int], bytes]:
        """The named blocks that ``prefix`` starts with, and the digest of the tokens they hold."""
        blocks: list[int] = []
        digest = _ROOT
        bs = self.block_size
        for start in range(0, len(prefix) - bs + 1, bs):
            step = _chain(digest, prefix[start:start + bs])
            block = self._named.get(step)
            if block is None:
                break
            blocks.append(block)
            digest = step
        return blocks, digest

    def _partial(self, parent: bytes, rest: Sequence[int]) -> tuple[int, int] | None:
        """The named block after ``parent`` whose tokens share the longest start with ``rest``: (block, shared)."""
        best = None
        if not rest:
            return None
        for block, tokens in self._children.get((parent, rest[0]), {}).items():
            shared = 0
            for a, b in zip(tokens, rest):
                if a != b:
                    break
                shared += 1
            if shared and (best is None or shared > best[1]):
                best = (block, shared)
        return best

    def allocate(self, tokens: int, prefix: Sequence[int] = (),
                 copy: Callable[[int, int, int], None] | None = None) -> tuple[list[int], int] | None:
        """Blocks for ``tokens`` tokens and how many of them are already computed, or None if there is no room.

        The leading blocks are cached ones whose tokens start ``prefix``. With ``copy(src, dst, n)``, which
        copies the first ``n`` token slots of block ``src`` into block ``dst``, the first fresh block also
        starts with the tokens ``prefix`` shares with a cached block after those.
        """
        matched, digest = self._match(prefix) if self.prefix_caching else ([], _ROOT)
        start = len(matched) * self.block_size
        partial = (self._partial(digest, prefix[start:start + self.block_size])
                   if copy is not None and self.prefix_caching else None)
        need = max(1, -(-tokens // self.block_size)) - len(matched)
        room = len(self._free) + len(self._idle) - sum(1 for b in matched if b in self._idle)
        if partial is not None and (need < 1 or need > room - (partial[0] in self._idle)):
            partial = None  # no block to copy into, or holding the source would take the last evictable one
        if need > room:
            return None
        held = matched + ([partial[0]] if partial else [])  # the source must outlive the evictions below
        for block in held:
            self._refs[block] = self._refs.get(block, 0) + 1
            self._idle.pop(block, None)
        fresh = []
        for _ in range(max(0, need)):
            if self._free:
                block = self._free.pop()
                self._highest = max(self._highest, block)
            else:  # give up the least recently used cached prefix
                block, _ = self._idle.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            fresh.append(block)
        if partial is None:
            return matched + fresh, start
        src, shared = partial
        try:
            copy(src, fresh[0], shared)
        except BaseException:
            self.release(matched + fresh)  # nothing handed out: the caller sees the error and no blocks
            raise
        finally:
            self.release([src])
        return matched + fresh, start + shared

    def _forget(self, block: int) -> None:
        del self._named[self._name_of.pop(block)]
        key = self._parent_of.pop(block)
        siblings = self._children[key]
        del siblings[block]
        if not siblings:
            del self._children[key]

    def publish(self, blocks: Sequence[int], tokens: Sequence[int]) -> None:
        """Name the blocks that ``tokens`` (the sequence's computed tokens, from position 0) fill entirely."""
        if not self.prefix_caching:
            return
        digest = _ROOT
        bs = self.block_size
        for i, start in enumerate(range(0, min(len(tokens), len(blocks) * bs) - bs + 1, bs)):
            parent, digest = digest, _chain(digest, tokens[start:start + bs])
            block = blocks[i]
            if block in self._name_of or digest in self._named:
                continue  # matched from the cache (named already), or another block holds this prefix: stays private
            self._named[digest] = block
            self._name_of[block] = digest
            key = (parent, tokens[start])
            self._parent_of[block] = key
            self._children.setdefault(key, {})[block] = tuple(tokens[start:start + bs])

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
