"""Per-call deadlines from each stage's own recent latency, not one fixed timeout.

A replica that accepts a call and never answers (frozen, partitioned, swapping) is found by the
health loop within seconds, but only if it also stops answering health checks; a deadline on the
call itself finds it either way. The deadline scales with the work in the call (rows x new
positions), from the slowest recent seconds-per-position of that stage, times a safety factor, never
below a floor (scheduling noise, a garbage collection) nor above `call_timeout`. Until a stage has
answered a few calls there is nothing to go by and `call_timeout` applies.
"""

from __future__ import annotations

from collections import deque

WINDOW = 64  # recent calls per stage
MIN_SAMPLES = 4  # before this many answers, call_timeout applies


class CallDeadlines:
    def __init__(self, stages: int, factor: float, floor: float, ceiling: float):
        self.factor, self.floor, self.ceiling = factor, floor, ceiling
        self._rates: list[deque[float]] = [deque(maxlen=WINDOW) for _ in range(stages)]

    def observe(self, stage: int, seconds: float, positions: int) -> None:
        """An answered call: `positions` = rows x new positions it computed."""
        self._rates[stage].append(seconds / max(positions, 1))

    def budget(self, stage: int, positions: int) -> float:
        """Seconds a call of this size to this stage may take before its replica counts as down."""
        rates = self._rates[stage]
        if self.factor <= 0 or len(rates) < MIN_SAMPLES:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.factor * max(rates) * max(positions, 1)))
