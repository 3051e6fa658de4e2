"""The per-sequence KV cache on its own: byte accounting of the valid positions only, LRU eviction
that spares the current batch, idle expiry on an injected clock, release, and views into a batch."""

from __future__ import annotations

import numpy as np

from functions.kvcache import Group, KVCache

H, D = 2, 4
ROW_BYTES_PER_POSITION = 2 * H * D * 4  # two tensors (key, value) of (H, D) float32 per position


def group(ids: tuple[int, ...], width: int, start: list[int]) -> Group:
    """A batch's presents: 2 tensors (B, H, width, D) whose values say (row, position)."""
    B = len(ids)
    a = np.zeros((B, H, width, D), dtype=np.float32)
    for b in range(B):
        a[b] = (b * 1000 + np.arange(width))[None, :, None]
    return Group([a, a + 0.5], np.array(start, dtype=np.int64), ids)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_entries_view_their_rows_valid_positions_without_copying() -> None:
    cache = KVCache(1 << 20, 60)
    g = group((7, 8), width=5, start=[2, 0])  # row 0 is left-padded by 2
    cache.put(7, g, 0, keep=(7, 8))
    cache.put(8, g, 1, keep=(7, 8))
    assert cache.lengths() == {7: 3, 8: 5}
    past = cache.get(7).past(0)  # (H, length, D)
    assert past.shape == (H, 3, D) and past[0, :, 0].tolist() == [2, 3, 4]
    assert np.shares_memory(past, g.arrays[0])  # a view, not a copy
    assert cache.get(8).past(1)[0, :, 0].tolist() == [1000.5, 1001.5, 1002.5, 1003.5, 1004.5]
    assert cache.bytes == (3 + 5) * ROW_BYTES_PER_POSITION  # padding is not counted


def test_lru_eviction_spares_the_current_batch() -> None:
    per_seq = 4 * ROW_BYTES_PER_POSITION
    cache = KVCache(3 * per_seq, 60)
    for s in (1, 2, 3):
        cache.put(s, group((s,), 4, [0]), 0)
    cache.get(1)  # 1 becomes the most recently used: 2 is now the least
    cache.put(4, group((4,), 4, [0]), 0, keep=(4,))
    assert set(cache.lengths()) == {1, 3, 4} and cache.evictions == 1
    # a batch bigger than the budget evicts everything else, never its own rows
    big = group((5, 6, 7, 8), 4, [0, 0, 0, 0])
    for row, s in enumerate(big.ids):
        cache.put(s, big, row, keep=big.ids)
    assert set(cache.lengths()) == {5, 6, 7, 8} and cache.evictions == 4
    assert cache.bytes == 4 * per_seq > cache.max_bytes  # over budget until the next put evicts


def test_replacing_an_entry_does_not_double_count() -> None:
    cache = KVCache(1 << 20, 60)
    cache.put(1, group((1,), 4, [0]), 0)
    cache.put(1, group((1,), 6, [0]), 0)
    assert cache.lengths() == {1: 6} and cache.bytes == 6 * ROW_BYTES_PER_POSITION


def test_idle_sequences_expire_on_the_clock() -> None:
    clock = Clock()
    cache = KVCache(1 << 20, idle_seconds=10, clock=clock)
    cache.put(1, group((1,), 2, [0]), 0)
    clock.t += 6
    cache.put(2, group((2,), 2, [0]), 0)
    clock.t += 6  # 1 idle for 12 s, 2 for 6 s
    assert cache.expire() == 1 and set(cache.lengths()) == {2} and cache.expirations == 1
    cache.get(2)  # use resets the idle time
    clock.t += 9
    assert cache.expire() == 0
    clock.t += 2
    assert cache.expire() == 1 and len(cache) == 0 and cache.bytes == 0


def test_release_is_idempotent() -> None:
    cache = KVCache(1 << 20, 60)
    cache.put(1, group((1,), 3, [0]), 0)
    assert 1 in cache and cache.release(1) and not cache.release(1)
    assert cache.length(1) == 0 and cache.get(1) is None and cache.bytes == 0
