"""Per-sequence KV cache of one stage: bounded in bytes (LRU first) and by idle time.

Everything here can be lost: a caller whose sequence is gone gets a 409 and replays the inputs.
`give_back_memory` hands the C heap's freed blocks back once the cache is empty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def dims(t: Any) -> tuple[int, ...]:
    """The shape of a numpy array or of an ONNX Runtime OrtValue (functions.kvstore)."""
    return t.shape if isinstance(t, np.ndarray) else tuple(t.shape())


@dataclass(eq=False)
class Group:
    """The present keys/values of one batch exactly as ONNX Runtime returned them. Rows keep
    pointing into it, so a batch that comes back with the same rows feeds it straight back in
    (no copy); row b's valid positions are [start[b], T), earlier ones are padding."""

    # one (B, H, T, D) tensor per past tensor of this stage, manifest order: numpy arrays, or
    # OrtValues on a device (functions.kvstore.DeviceStore)
    arrays: list[Any]
    start: np.ndarray  # (B,) first valid position of each row
    ids: tuple[int, ...]  # the sequence id of each row
    width: int = field(init=False)  # T
    row_nbytes: int = field(init=False)  # bytes of one row (H, T, D) of every tensor together

    def __post_init__(self) -> None:
        shape = dims(self.arrays[0])
        self.width = int(shape[2])
        self.row_nbytes = len(self.arrays) * math.prod(shape[1:]) * 4  # float32


@dataclass
class Entry:
    group: Group
    row: int
    length: int  # positions held: group.width - group.start[row]
    nbytes: int  # bytes of the valid positions (padding in the group is not counted)
    last_used: float

    def past(self, i: int) -> np.ndarray:
        """Past tensor i of this sequence: (H, length, D), a view (host-store groups only)."""
        array: np.ndarray = self.group.arrays[i]
        return array[self.row, :, self.group.width - self.length :]


class KVCache:
    """Not thread-safe on its own: the stage engine holds its lock around every use."""

    def __init__(self, max_bytes: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.evictions = 0  # dropped for the byte budget
        self.expirations = 0  # dropped for being idle
        self.misses = 0  # rows whose past length did not match (counted by the engine)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._entries

    def length(self, seq_id: int) -> int:
        e = self._entries.get(seq_id)
        return 0 if e is None else e.length

    def lengths(self) -> dict[int, int]:
        """Every held sequence with its length."""
        return {s: e.length for s, e in self._entries.items()}

    def get(self, seq_id: int) -> Entry | None:
        e = self._entries.get(seq_id)
        if e is not None:
            e.last_used = self.clock()
            self._entries.move_to_end(seq_id)
        return e

    def put(self, seq_id: int, group: Group, row: int, keep: Iterable[int] = ()) -> None:
        """Store (replacing any old entry), then evict least recently used sequences, never the
        ones in `keep` (the rest of the current batch), until the budget holds."""
        self.release(seq_id)
        length = group.width - int(group.start[row])
        nbytes = group.row_nbytes * length // max(group.width, 1)
        self._entries[seq_id] = Entry(group, row, length, nbytes, self.clock())
        self.bytes += nbytes
        if self.bytes > self.max_bytes:
            protected = set(keep) | {seq_id}
            for victim in [s for s in self._entries if s not in protected]:
                if self.bytes <= self.max_bytes:
                    break
                self._drop(victim)
                self.evictions += 1

    def fork(self, parent: int, children: Iterable[int]) -> None:
        """Each child holds what `parent` holds, sharing its arrays (no copy: stored keys/values are
        never written to); each is counted at the parent's bytes, so the budget stays an upper bound."""
        e = self._entries[parent]
        kids = list(children)
        for child in kids:
            self.put(child, e.group, e.row, keep=[parent, *kids])
        self.get(parent)

    def release(self, seq_id: int) -> bool:
        if seq_id not in self._entries:
            return False
        self._drop(seq_id)
        return True

    def expire(self) -> int:
        """Drop the sequences idle for longer than idle_seconds; returns how many."""
        cutoff = self.clock() - self.idle_seconds
        stale = [s for s, e in self._entries.items() if e.last_used < cutoff]
        for s in stale:
            self._drop(s)
        self.expirations += len(stale)
        return len(stale)

    def _drop(self, seq_id: int) -> None:
        self.bytes -= self._entries.pop(seq_id).nbytes


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def give_back_memory() -> None:
    """Return the C heap's free memory to the system (glibc keeps freed blocks otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
