"""Where the layers are cut: an explicit `--layers` split checked for cover, or `--stages N` split so
that the stages' weights are as even as contiguous layers allow.

A stage's bytes are its layers' parameters, plus the token (and position) embedding on the first
and the final norm + LM head on the last. A tied LM head counts on the last stage too: the first
and the last stage each store the matrix (once when they are the same stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from export.errors import ExportError

DEFAULT_STAGES = 3


@dataclass(frozen=True)
class Costs:
    """Parameter bytes of each part of the model, as the stages will store them."""

    layers: list[int]  # per decoder layer
    first: int  # token + position embeddings
    last: int  # final norm + LM head (the tied matrix counted again)
    tied: int = 0  # bytes of the tied matrix (0 when the LM head has its own)

    def stage_bytes(self, ranges: list[tuple[int, int]]) -> list[int]:
        n = len(self.layers)
        out = []
        for a, b in ranges:
            size = sum(self.layers[a:b]) + (self.first if a == 0 else 0) + (self.last if b == n else 0)
            if a == 0 and b == n:
                size -= self.tied  # one graph stores the shared matrix once
            out.append(size)
        return out


def _bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def costs_of(parts: Any) -> Costs:
    """The byte costs of a loaded model's parts (export/families.py Parts)."""
    first = _bytes(parts.embed) + (_bytes(parts.positions) if parts.positions is not None else 0)
    tied = parts.lm_head.weight is parts.embed.weight
    head = _bytes(parts.lm_head)
    return Costs([_bytes(m) for m in parts.layers], first, _bytes(parts.norm) + head, head if tied else 0)


def parse_layers(layers: str, n_layer: int) -> list[tuple[int, int]]:
    """`a:b,b:c,...` checked to cover layers 0..n_layer exactly, in order, each range non-empty."""
    try:
        ranges = [tuple(int(x) for x in part.split(":")) for part in layers.split(",")]
    except ValueError:
        raise ExportError(f"--layers {layers!r}: expected ranges like 0:4,4:8,8:12") from None
    if any(len(r) != 2 for r in ranges):
        raise ExportError(f"--layers {layers!r}: each range is START:STOP, like 0:4")
    expect = 0
    for a, b in ranges:
        if a != expect or b <= a:
            raise ExportError(
                f"--layers {layers!r} must cover layers 0..{n_layer} exactly, in order, each "
                f"range non-empty (problem at {a}:{b}; expected it to start at {expect})"
            )
        expect = b
    if expect != n_layer:
        raise ExportError(f"--layers {layers!r} ends at {expect}; the model has {n_layer} layers")
    return ranges  # type: ignore[return-value]


def balanced(costs: Costs, n: int) -> list[tuple[int, int]]:
    """Contiguous ranges for `n` stages whose largest stage is as small as possible (then the
    earliest such cut, so equal layers split as evenly as counts allow). Dynamic programming over
    (stages, layers): a few thousand steps for any real model."""
    L = len(costs.layers)
    if n < 1 or n > L:
        raise ExportError(f"--stages {n}: must be between 1 and the number of layers ({L})")
    prefix = [0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> int:  # Costs.stage_bytes of one range, from the prefix sums
        extra = (costs.first if a == 0 else 0) + (costs.last if b == L else 0)
        return prefix[b] - prefix[a] + extra - (costs.tied if (a, b) == (0, L) else 0)

    # best[k][b]: the smallest largest-stage size covering layers [0, b) with k stages
    inf = float("inf")
    best: list[list[float]] = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for b in range(k, L - (n - k) + 1):
            for a in range(k - 1, b):
                v = max(best[k - 1][a], cost(a, b))
                if v < best[k][b]:
                    best[k][b], cut[k][b] = v, a
    ranges, b = [], L
    for k in range(n, 0, -1):
        a = cut[k][b]
        ranges.append((a, b))
        b = a
    return ranges[::-1]


def plan(costs: Costs, stages: int | None, layers: str | None) -> tuple[list[tuple[int, int]], str]:
    """The ranges and how they were chosen (for the log and the manifest)."""
    if layers:
        return parse_layers(layers, len(costs.layers)), "explicit (--layers)"
    return balanced(costs, DEFAULT_STAGES if stages is None else stages), "balanced by bytes"
