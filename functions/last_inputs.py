"""The last stage's part of a batch, checked once by `functions.batch` and carried on the batch: the
sampling parameters, the logits processors' inputs (functions.processors applies them) and the
scoring requests (functions.scoring answers them). Each parser raises ContractError naming the
tensor and what is wrong; optional inputs a batch does not send cost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from functions import contract as c
from functions.contract import ContractError

NO_HEAD = (
    "prompt scoring ({}) needs the scoring head, which this bundle was exported without: re-export "
    "the model with `python -m export` (make up rebuilds an outdated bundle)"
)


@dataclass(frozen=True)
class Sampling:
    """Per-row sampling parameters of a last-stage batch."""

    temperature: np.ndarray  # (B,) float32, 0 = greedy
    top_k: np.ndarray  # (B,) int64, 0 = off
    top_p: np.ndarray  # (B,) float32, 1 = off
    seed: np.ndarray  # (B,) int64, < 0 = fresh entropy


@dataclass(frozen=True)
class Processors:
    """Per-row inputs of the logits processors; every array has B rows."""

    presence: np.ndarray  # (B,) float32, 0 = off
    frequency: np.ndarray  # (B,) float32, 0 = off
    repetition: np.ndarray  # (B,) float32, 1 = off
    tokens: np.ndarray  # (B, L) int64: the row's prompt ids then its generated ids, -1 = padding
    prompt_lengths: np.ndarray  # (B,) int64: leading entries of `tokens` that are prompt
    bias_ids: np.ndarray  # (B, K) int64, -1 = padding
    bias_values: np.ndarray  # (B, K) float32
    banned: np.ndarray  # (B, K2) int64, -1 = padding


@dataclass(frozen=True)
class ScoreRequest:
    """What a batch asks of the scoring outputs (functions.scoring)."""

    num_top: np.ndarray | None  # (B,) int64 in [0, TOP_LOGPROBS_MAX]
    targets: np.ndarray | None  # (B, S) int64, -1 where nothing is scored

    @property
    def k(self) -> int:
        """Alternatives per position in this batch's answers."""
        return int(self.num_top.max()) if self.num_top is not None else 0

    @property
    def scores_positions(self) -> bool:
        return self.targets is not None and bool((self.targets >= 0).any())


def parse_sampling(inputs: Mapping[str, np.ndarray], B: int, vocab_size: int) -> Sampling:
    values: dict[str, np.ndarray] = {}
    for p in c.SAMPLING:
        a = inputs.get(p.name)
        if a is None:
            a = np.full(B, p.default, dtype=p.dtype)
        elif a.dtype != p.dtype or a.shape != (B,):
            raise ContractError(f"{p.name} must be {p.datatype} [{B}]")
        values[p.name] = a
    s = Sampling(**values)
    t, k, top_p = s.temperature, s.top_k, s.top_p
    if not np.isfinite(t).all() or (t < 0).any() or (t > c.TEMPERATURE_MAX).any():
        raise ContractError(f"{c.TEMPERATURE} must be finite and in [0, {c.TEMPERATURE_MAX:g}]")
    if (k < 0).any() or (k > vocab_size).any():
        raise ContractError(f"{c.TOP_K} must be in [0, {vocab_size}] (0 = off)")
    if not np.isfinite(top_p).all() or (top_p <= 0).any() or (top_p > 1).any():
        raise ContractError(f"{c.TOP_P} must be in (0, 1]")
    return s


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


def parse_processors(inputs: Mapping[str, np.ndarray], B: int, vocab_size: int) -> Processors | None:
    """The checked processor inputs of a batch, or None when the batch sends none of them."""
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


def parse_scoring(
    inputs: Mapping[str, np.ndarray], mask: np.ndarray, vocab_size: int, has_head: bool
) -> ScoreRequest | None:
    """The batch's scoring inputs beside its (B, S) attention mask; None without any."""
    top, targets = inputs.get(c.NUM_TOP), inputs.get(c.TARGET_IDS)
    if top is None and targets is None:
        return None
    B, S = mask.shape
    if top is not None:
        if top.dtype != np.int64 or top.shape != (B,):
            raise ContractError(f"{c.NUM_TOP} must be INT64 [{B}]; got {top.dtype} {list(top.shape)}")
        if (top < 0).any() or (top > c.TOP_LOGPROBS_MAX).any():
            raise ContractError(f"{c.NUM_TOP} must be in [0, {c.TOP_LOGPROBS_MAX}]")
    if targets is not None:
        if not has_head:
            raise ContractError(NO_HEAD.format(c.TARGET_IDS))
        if targets.dtype != np.int64 or targets.shape != (B, S):
            raise ContractError(
                f"{c.TARGET_IDS} must be INT64 [{B}, {S}] beside the new positions; got "
                f"{targets.dtype} {list(targets.shape)}"
            )
        if (targets < -1).any() or (targets >= vocab_size).any():
            raise ContractError(f"{c.TARGET_IDS} must be -1 (not scored) or in [0, {vocab_size})")
        if ((mask == 0) & (targets != -1)).any():
            raise ContractError(f"{c.TARGET_IDS} must be -1 at padding positions")
    return ScoreRequest(top, targets)
