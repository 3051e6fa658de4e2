"""Next-token choice in the last stage: greedy, temperature, top-k, top-p, seeded.

A row's random stream is derived from (seed, position of the token being chosen), so the same
seed gives the same tokens whatever the batch the row happened to share.
"""

from __future__ import annotations

import numpy as np

from functions.last_inputs import Sampling


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def sample(
    logits: np.ndarray,  # (B, V) float32
    params: Sampling,
    positions: np.ndarray,  # (B,) absolute position of the token being chosen
    want_logprobs: bool = False,
    raw: np.ndarray | None = None,  # (B, V) the model's logits when `logits` were processed
) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns token_ids (B,) int64 and, when asked, their log-probabilities (B,) under the
    model's unmodified distribution (`raw` when given, else `logits`)."""
    temperature, top_k, top_p, seed = params.temperature, params.top_k, params.top_p, params.seed
    token_ids = logits.argmax(axis=-1).astype(np.int64)  # (B,)
    for b in np.nonzero(temperature > 0)[0]:
        row = logits[b].astype(np.float64) / float(temperature[b])  # (V,)
        cand = np.arange(row.shape[0])
        k = int(top_k[b])
        if 0 < k < row.shape[0]:
            cand = np.argpartition(row, -k)[-k:]
        order = cand[np.argsort(-row[cand], kind="stable")]  # candidates, best first
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        if top_p[b] < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), float(top_p[b]))) + 1
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        rng = np.random.default_rng(None if seed[b] < 0 else [int(seed[b]), int(positions[b])])
        token_ids[b] = order[int(rng.choice(len(order), p=p))]
    if not want_logprobs:
        return token_ids, None
    lp = log_softmax((logits if raw is None else raw).astype(np.float64))  # (B, V)
    return token_ids, lp[np.arange(len(token_ids)), token_ids].astype(np.float32)
