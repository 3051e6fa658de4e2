"""Logits processors of the last stage: banned tokens (min_tokens), logit_bias, and the repetition,
frequency and presence penalties, applied before the token is chosen.

The stage holds no request state for them (a row may be replayed on another replica): the caller
sends, only for the rows that use one, the token ids a penalty counts and the sparse biases. A batch
without any of these inputs gets None from `from_tensors` and costs nothing.
Order (as vLLM): logit_bias, then the repetition, frequency and presence penalties; banned ids last,
so nothing lifts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from functions import contract as c
from functions.contract import ContractError


@dataclass(frozen=True)
class Processors:
    """Per-row inputs of a last-stage batch; every array has B rows."""

    presence: np.ndarray  # (B,) float32, 0 = off
    frequency: np.ndarray  # (B,) float32, 0 = off
    repetition: np.ndarray  # (B,) float32, 1 = off
    tokens: np.ndarray  # (B, L) int64: the row's prompt ids then its generated ids, -1 = padding
    prompt_lengths: np.ndarray  # (B,) int64: leading entries of `tokens` that are prompt
    bias_ids: np.ndarray  # (B, K) int64, -1 = padding
    bias_values: np.ndarray  # (B, K) float32
    banned: np.ndarray  # (B, K2) int64, -1 = padding


def _ids(inputs: Mapping[str, np.ndarray], name: str, B: int, vocab_size: int) -> np.ndarray:
    a = inputs.get(name)
    if a is None:
        return np.full((B, 0), -1, dtype=np.int64)
    if a.dtype != np.int64 or a.ndim != 2 or a.shape[0] != B:
        raise ContractError(f"{name} must be INT64 [{B}, n] (-1 = padding); got {a.dtype} {list(a.shape)}")
    if a.size and ((a < -1).any() or (a >= vocab_size).any()):
        raise ContractError(f"{name} must hold token ids in [0, {vocab_size}) or -1 (padding)")
    return a


def _row(
    inputs: Mapping[str, np.ndarray], name: str, B: int, default: float, lo: float, hi: float
) -> np.ndarray:
    a = inputs.get(name)
    if a is None:
        return np.full(B, default, dtype=np.float32)
    if a.dtype != np.float32 or a.shape != (B,):
        raise ContractError(f"{name} must be FP32 [{B}]; got {a.dtype} {list(a.shape)}")
    if not np.isfinite(a).all() or (a < lo).any() or (a > hi).any():
        raise ContractError(f"{name} must be finite and in [{lo:g}, {hi:g}]")
    return a


def from_tensors(inputs: Mapping[str, np.ndarray], B: int, vocab_size: int) -> Processors | None:
    """The checked processor inputs of a batch (ContractError naming the tensor), or None when the
    batch sends none of them."""
    if not any(name in inputs for name, _, _ in c.PROCESSOR_INPUTS):
        return None
    m = c.PENALTY_MAX
    presence = _row(inputs, c.PRESENCE_PENALTY, B, 0.0, -m, m)
    frequency = _row(inputs, c.FREQUENCY_PENALTY, B, 0.0, -m, m)
    repetition = _row(inputs, c.REPETITION_PENALTY, B, 1.0, 0.0, float(np.finfo(np.float32).max))
    if (repetition <= 0).any():
        raise ContractError(f"{c.REPETITION_PENALTY} must be > 0 (1 = off)")
    tokens = _ids(inputs, c.PENALTY_TOKEN_IDS, B, vocab_size)
    lengths = inputs.get(c.PENALTY_PROMPT_LENGTHS)
    if lengths is None:
        lengths = np.zeros(B, dtype=np.int64)
    elif lengths.dtype != np.int64 or lengths.shape != (B,):
        raise ContractError(f"{c.PENALTY_PROMPT_LENGTHS} must be INT64 [{B}]")
    elif (lengths < 0).any() or (lengths > tokens.shape[1]).any():
        raise ContractError(
            f"{c.PENALTY_PROMPT_LENGTHS} must be in [0, {tokens.shape[1]}] (the width of {c.PENALTY_TOKEN_IDS})"
        )
    bias_ids = _ids(inputs, c.LOGIT_BIAS_IDS, B, vocab_size)
    values = inputs.get(c.LOGIT_BIAS_VALUES)
    if values is None:
        values = np.zeros(bias_ids.shape, dtype=np.float32)
    if values.dtype != np.float32 or values.shape != bias_ids.shape:
        raise ContractError(
            f"{c.LOGIT_BIAS_VALUES} must be FP32 with the shape of {c.LOGIT_BIAS_IDS} {list(bias_ids.shape)}"
        )
    lim = c.LOGIT_BIAS_MAX
    if not np.isfinite(values).all() or (np.abs(values) > lim).any():
        raise ContractError(f"{c.LOGIT_BIAS_VALUES} must be finite and in [{-lim:g}, {lim:g}]")
    banned = _ids(inputs, c.BANNED_TOKEN_IDS, B, vocab_size)
    return Processors(presence, frequency, repetition, tokens, lengths, bias_ids, values, banned)


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
