"""Log-probabilities beyond the sampled token's, in the last stage, asked per row and paid only by
the rows that ask (the decode hot path never runs any of this):

- `num_top_logprobs` (B,): the top-N alternatives at the sampled position, from the logits the
  graph computes anyway (top_token_ids / top_logprobs (B, K), K = the batch's largest N);
- `target_ids` (B, S) beside the new positions: at each position with a target >= 0, the
  log-probability of that next token and the top-N there (target_logprobs (N,), target_top_* (N, K),
  in row-major order of the positions asked). The scoring head (export/head.py) runs on just those
  positions' final hidden states; a bundle exported without it refuses them (re-export).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from functions import contract as c
from functions.bundle import Manifest
from functions.last_inputs import ScoreRequest
from functions.sampling import log_softmax


class Head:
    """The scoring head's ONNX session."""

    def __init__(self, path: Path, options: Any, providers: list[str]):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), options, providers=providers)

    @classmethod
    def load(cls, bundle: Path, manifest: Manifest, options: Any, providers: list[str]) -> Head | None:
        """The bundle's head, or None for a bundle exported before it existed."""
        if manifest.head is None:
            return None
        return cls(Path(bundle) / str(manifest.head["file"]), options, providers)

    def run(self, hidden: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
        """(N, C) hidden states, (N,) targets -> target logprobs (N,), top ids (N, 5), top logprobs (N, 5)."""
        out: list[np.ndarray] = self.session.run(None, {c.HEAD_HIDDEN: hidden, c.TARGET_IDS: targets})
        return out


def top_of(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row of (R, V) log-probabilities, best first: ids (R, k), values (R, k)."""
    part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]  # (R, k), unordered
    vals = np.take_along_axis(logprobs, part, axis=-1)  # (R, k)
    order = np.argsort(-vals, axis=-1, kind="stable")  # (R, k)
    return np.take_along_axis(part, order, -1).astype(np.int64), np.take_along_axis(vals, order, -1)


def score_outputs(
    req: ScoreRequest,
    logits: np.ndarray,  # (B, V) of the sampled position
    hidden: np.ndarray | None,  # (B, S, C) final hidden states, when the batch scores positions
    head: Head | None,
    want: Collection[str],
) -> dict[str, np.ndarray]:
    """The scoring outputs in `want` (the batch check made sure the inputs they need are sent)."""
    out: dict[str, np.ndarray] = {}
    k = req.k

    def asked(name: str) -> bool:
        return name in want

    if asked(c.TOP_IDS) or asked(c.TOP_LOGPROBS):
        B = logits.shape[0]
        ids, lps = np.zeros((B, k), dtype=np.int64), np.zeros((B, k), dtype=np.float32)
        rows = np.nonzero(req.num_top > 0)[0] if req.num_top is not None else np.zeros(0, dtype=np.int64)
        if k and len(rows):
            ids[rows], got = top_of(log_softmax(logits[rows].astype(np.float64)), k)
            lps[rows] = got
        out[c.TOP_IDS], out[c.TOP_LOGPROBS] = ids, lps
    if any(asked(n) for n in (c.TARGET_LOGPROBS, c.TARGET_TOP_IDS, c.TARGET_TOP_LOGPROBS)):
        if req.scores_positions:
            assert req.targets is not None and hidden is not None and head is not None
            where = req.targets >= 0  # (B, S)
            target, top_ids, top_lps = head.run(np.ascontiguousarray(hidden[where]), req.targets[where])
        else:
            target = np.zeros(0, dtype=np.float32)
            top_ids, top_lps = np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        out[c.TARGET_LOGPROBS] = target.astype(np.float32)
        out[c.TARGET_TOP_IDS] = np.ascontiguousarray(top_ids[:, :k])
        out[c.TARGET_TOP_LOGPROBS] = np.ascontiguousarray(top_lps[:, :k].astype(np.float32))
    return out
