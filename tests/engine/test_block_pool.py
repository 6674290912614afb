"""Prefix caching's bookkeeping: whole blocks named by their tokens, shared, kept, given up LRU."""

from __future__ import annotations

import pytest

from llama_lab.engine.block_pool import BlockPool

BS = 4


def _pool(blocks: int = 9, **kw) -> BlockPool:
    return BlockPool(blocks, BS, **kw)  # block 0 is the scratch block: never handed out


def test_a_prompt_reuses_the_whole_blocks_an_earlier_one_filled():
    pool = _pool()
    prompt = list(range(100, 111))  # 11 tokens: two whole blocks and three more
    blocks, cached = pool.allocate(16, prompt)
    assert cached == 0 and len(blocks) == 4 and 0 not in blocks
    pool.publish(blocks, prompt)
    pool.release(blocks)
    assert pool.free_blocks == 8 and pool.cached_blocks == 2
    again, cached = pool.allocate(16, prompt + [7, 7])
    assert cached == 2 * BS and again[:2] == blocks[:2]
    # a prompt that differs inside the second block reuses only the first
    pool.release(again)
    other, cached = pool.allocate(12, prompt[:5] + [0, 0, 0, 0])
    assert cached == BS and other[0] == blocks[0]


def test_the_chain_names_a_block_by_everything_before_it():
    pool = _pool()
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    blocks, _ = pool.allocate(8)
    pool.publish(blocks, a)
    pool.release(blocks)
    # the same second block after a different first one is not a match
    _, cached = pool.allocate(12, [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert cached == 0


def test_shared_blocks_are_counted_and_only_freed_by_the_last_user():
    pool = _pool()
    prompt = list(range(8)) + [42]
    first, _ = pool.allocate(12, prompt)
    pool.publish(first, prompt)  # the prompt is in (published when its prefill ends): others may share
    second, cached = pool.allocate(12, prompt)
    assert cached == 8 and second[:2] == first[:2] and second[2] != first[2]
    pool.release(first)
    third, cached = pool.allocate(12, prompt)
    assert cached == 8 and third[:2] == first[:2]
    pool.release(second)
    pool.release(third)
    pool.release(third)  # a second release gives nothing back twice
    assert pool.free_blocks == 8


def test_cached_prefixes_give_way_least_recently_used_first():
    pool = _pool(blocks=5)  # 4 usable blocks
    a, b = [1] * 8, [2] * 8
    for prompt in (a, b):
        blocks, _ = pool.allocate(8)
        pool.publish(blocks, prompt)
        pool.release(blocks)
    assert pool.cached_blocks == 4 and pool.free_blocks == 4
    touched, cached = pool.allocate(8, a + [0])  # a is used again: b is now the older one
    assert cached == 8
    pool.release(touched)
    fresh, cached = pool.allocate(8)  # two blocks and nothing free: b's are given up
    assert cached == 0 and pool.cached_blocks == 2
    pool.release(fresh)
    assert pool.allocate(4, b + [0])[1] == 0
    assert pool.allocate(8, a + [0])[1] == 8


def test_no_room_is_none_and_changes_nothing():
    pool = _pool(blocks=3)
    held, _ = pool.allocate(8)
    assert pool.allocate(1) is None
    pool.release(held)
    assert pool.free_blocks == 2


def test_off_means_no_names_and_no_reuse():
    pool = _pool(prefix_caching=False)
    blocks, _ = pool.allocate(8)
    pool.publish(blocks, list(range(8)))
    pool.release(blocks)
    assert pool.cached_blocks == 0 and pool.allocate(8, list(range(9)))[1] == 0


def test_touched_blocks_count_every_block_ever_written_not_the_ones_in_use():
    """On a CPU the cache is uninitialized memory: only blocks ever handed out cost resident pages."""
    pool = _pool(prefix_caching=False)
    assert pool.touched_blocks == 0
    first, _ = pool.allocate(3 * BS)
    assert pool.touched_blocks == 3
    pool.release(first)
    again, _ = pool.allocate(2 * BS)  # released blocks are handed out again first: nothing new is touched
    assert pool.touched_blocks == 3 and set(again) <= set(first)
    pool.allocate(2 * BS)
    assert pool.touched_blocks == 4


class _Copies:
    """Stands in for the KV cache's copy: records (src, dst, n)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, src: int, dst: int, n: int) -> None:
        self.calls.append((src, dst, n))


def test_a_resent_prompt_also_takes_the_tokens_it_shares_with_a_cached_blocks_start():
    pool, copies = _pool(), _Copies()
    prompt = list(range(100, 111))  # 11 tokens; with 3 answer tokens its third block is full
    blocks, _ = pool.allocate(16, prompt, copy=copies)
    pool.publish(blocks, prompt + [7, 8, 9])
    pool.release(blocks)
    assert pool.cached_blocks == 3 and not copies.calls
    # the same prompt again (a regenerated answer): its last token is computed, the 10 before it are not
    again, cached = pool.allocate(16, prompt[:-1], copy=copies)
    assert cached == 10 and again[:2] == blocks[:2] and again[2] != blocks[2]
    assert copies.calls == [(blocks[2], again[2], 2)]
    assert pool.cached_blocks == 3  # the source stays cached, free to be given up again
    pool.release(again)
    assert pool.free_blocks == 8
    # without a copy, or with a different token first in the block, only whole blocks count
    plain, cached = pool.allocate(16, prompt[:-1])
    assert cached == 8
    pool.release(plain)
    other, cached = pool.allocate(16, prompt[:8] + [0, 109], copy=copies)
    assert cached == 8 and len(copies.calls) == 1
    pool.release(other)


def test_the_longest_shared_start_among_a_blocks_successors_is_taken():
    pool, copies = _pool(blocks=12), _Copies()
    for tail in ([5, 6, 1, 1], [5, 6, 7, 1], [9, 9, 9, 9]):
        blocks, _ = pool.allocate(8)
        pool.publish(blocks, [1, 2, 3, 4] + tail)
        pool.release(blocks)
    got, cached = pool.allocate(12, [1, 2, 3, 4, 5, 6, 7, 2], copy=copies)
    assert cached == 7 and copies.calls[0][2] == 3


def test_a_partial_source_that_would_take_the_last_room_is_not_used_and_once_given_up_is_forgotten():
    pool, copies = _pool(blocks=4), _Copies()  # 3 usable blocks
    first, _ = pool.allocate(8)
    pool.publish(first, [1, 2, 3, 4, 5, 6, 7, 8])
    pool.release(first)
    # 3 blocks needed: the whole first block, a fresh one and one more; the only other block is the partial
    # source, and holding it would leave no room: its tokens are computed instead
    got, cached = pool.allocate(12, [1, 2, 3, 4, 5, 6, 0], copy=copies)
    assert cached == 4 and not copies.calls
    pool.release(got)
    # the source was given up for that request: it is no longer a candidate
    assert pool.allocate(8, [1, 2, 3, 4, 5, 6, 7], copy=copies)[1] == 4 and not copies.calls


def test_a_failed_copy_hands_out_nothing_and_keeps_the_cache():
    pool = _pool()
    prompt = list(range(100, 111))
    blocks, _ = pool.allocate(16, prompt)
    pool.publish(blocks, prompt + [7, 8, 9])
    pool.release(blocks)

    def broken(src: int, dst: int, n: int) -> None:
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError, match="copy failed"):
        pool.allocate(16, prompt[:-1], copy=broken)
    assert pool.free_blocks == 8 and pool.cached_blocks == 3
    assert pool.allocate(16, prompt[:-1], copy=_Copies())[1] == 10
