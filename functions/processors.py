"""Logits processors of the last stage: banned tokens (min_tokens), logit_bias, and the repetition,
frequency and presence penalties, applied before the token is chosen.

The stage holds no request state for them (a row may be replayed on another replica): the caller
sends, only for the rows that use one, the token ids a penalty counts and the sparse biases; the
batch check reads them (functions.last_inputs). A batch without any of these inputs has none and
costs nothing.
Order (as vLLM): logit_bias, then the repetition, frequency and presence penalties; banned ids last,
so nothing lifts them.
"""

from __future__ import annotations

import numpy as np

from functions import contract as c
from functions.contract import ContractError
from functions.last_inputs import Processors


def apply(logits: np.ndarray, p: Processors) -> np.ndarray:
    """The processed logits (B, V) float32: a copy when some row changes, `logits` itself otherwise."""
    out = logits
    for b in range(logits.shape[0]):
        row = _apply_row(logits[b], p, b)
        if row is not None:
            if out is logits:
                out = logits.copy()
            out[b] = row
    return out


def _apply_row(logits: np.ndarray, p: Processors, b: int) -> np.ndarray | None:
    banned = p.banned[b][p.banned[b] >= 0]
    keep = p.bias_ids[b] >= 0
    bias_ids, bias = p.bias_ids[b][keep], p.bias_values[b][keep]
    toks = p.tokens[b]
    generated = toks[int(p.prompt_lengths[b]) :]
    generated = generated[generated >= 0]
    pres, freq, rep = float(p.presence[b]), float(p.frequency[b]), float(p.repetition[b])
    if not len(banned) and not len(bias_ids) and not (rep != 1 or pres or freq):
        return None
    row = logits.astype(np.float32, copy=True)  # (V,)
    np.add.at(row, bias_ids, bias)  # a repeated id adds up, as its entries say
    if rep != 1:
        seen = np.unique(toks[toks >= 0])
        v = row[seen]
        row[seen] = np.where(v > 0, v / rep, v * rep)
    if (pres or freq) and len(generated):
        ids, counts = np.unique(generated, return_counts=True)
        row[ids] -= freq * counts.astype(np.float32) + pres
    row[banned] = -np.inf
    if not np.isfinite(row).any():
        raise ContractError(f"{c.BANNED_TOKEN_IDS} leaves row {b} no token to choose")
    return row
