"""A checked batch: decoded wire tensors (and the outputs a request names) checked against the stage
contract once, into the one object the stage engine runs, the last stage's sampling, logits
processors and scoring inputs included (functions.last_inputs). Anything wrong raises
ContractError saying which tensor and how (the stage answers 400).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from functions.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    NEEDED_INPUTS,
    OUTPUT_NEEDS,
    PAST_LENGTHS,
    SEQUENCE_END,
    SEQUENCE_IDS,
    SEQUENCE_START,
    TARGET_IDS,
    ContractError,
)
from functions.last_inputs import (
    NO_HEAD,
    Processors,
    Sampling,
    ScoreRequest,
    parse_processors,
    parse_sampling,
    parse_scoring,
)
from functions.stage_io import StageIO


@dataclass(frozen=True)
class StageBatch:
    """A checked batch, as the stage engine runs it."""

    sequence_ids: np.ndarray  # (B,) int64, unique
    past_lengths: np.ndarray  # (B,) int64 >= 0
    x: np.ndarray  # (B, S) int64 or (B, S, C) float32
    mask: np.ndarray  # (B, S) int64, each row 0s then at least one 1
    n_new: np.ndarray  # (B,) int64: real new positions per row
    end: np.ndarray | None  # (B,) bool
    start: np.ndarray | None  # (B,) bool: restart these rows (past_lengths must be 0)
    outputs: frozenset[str]  # what to answer: as asked, or the stage's defaults
    sampling: Sampling | None = None  # last stage only
    processors: Processors | None = None  # last stage, when some row uses a logits processor
    scoring: ScoreRequest | None = None  # last stage, when some row asks for scores

    @property
    def size(self) -> int:
        return int(self.sequence_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.x.shape[1])

    def wants(self, name: str) -> bool:
        return name in self.outputs

    @classmethod
    def from_tensors(
        cls, inputs: Mapping[str, np.ndarray], io: StageIO, want: Collection[str] | None = None
    ) -> StageBatch:
        """Check decoded wire tensors and the outputs asked for (None: the defaults)."""
        outputs = _check_outputs(want, inputs, io)
        ids, past = _check_rows(inputs, io)
        B = ids.shape[0]
        x = _check_x(inputs[io.x_name], io, B)  # _check_rows found it
        mask, n_new = _check_mask(inputs.get(ATTENTION_MASK), B, x.shape[1])
        too_long = past + n_new > io.max_positions
        if too_long.any():
            b = int(np.argmax(too_long))
            raise ContractError(
                f"sequence {int(ids[b])} would reach position {int(past[b] + n_new[b])}, "
                f"beyond the context window of {io.max_positions}"
            )
        end, start = _flag(inputs, SEQUENCE_END, B), _flag(inputs, SEQUENCE_START, B)
        if start is not None and (start & (past != 0)).any():
            raise ContractError(f"{SEQUENCE_START} rows must have {PAST_LENGTHS} 0")
        if not io.last:
            return cls(ids, past, x, mask, n_new, end, start, outputs)
        return cls(
            ids,
            past,
            x,
            mask,
            n_new,
            end,
            start,
            outputs,
            parse_sampling(inputs, B, io.vocab_size),
            parse_processors(inputs, B, io.vocab_size),
            parse_scoring(inputs, mask, io.vocab_size, io.scoring),
        )


def _check_outputs(
    want: Collection[str] | None, inputs: Mapping[str, np.ndarray], io: StageIO
) -> frozenset[str]:
    """The outputs to answer: each one asked for is listed by this stage and computable from the
    inputs sent (contract.OUTPUT_NEEDS), so a request never gets less than it asked for."""
    if want is None:
        return io.default_outputs(inputs.keys())
    known = io.output_names
    unknown = set(want) - known
    if unknown:
        raise ContractError(f"unknown output(s) {sorted(unknown)}; this stage returns {sorted(known)}")
    for name in sorted(want):
        need = OUTPUT_NEEDS.get(name)
        if need is not None and need not in inputs:
            raise ContractError(
                f"{name} needs {need}: send {need} ({NEEDED_INPUTS[need]}) or leave {name} out of the outputs"
            )
    return frozenset(want)


def _check_names(inputs: Mapping[str, np.ndarray], io: StageIO) -> None:
    if TARGET_IDS in inputs and io.last and not io.scoring:
        raise ContractError(NO_HEAD.format(TARGET_IDS))
    allowed = io.input_names
    if not allowed.issuperset(inputs):
        unknown = sorted(set(inputs) - allowed)
        raise ContractError(f"unknown input tensor(s) {unknown}; this stage takes {sorted(allowed)}")
    for req in (SEQUENCE_IDS, PAST_LENGTHS, io.x_name):
        if req not in inputs:
            raise ContractError(f"missing input tensor {req!r}")


def _check_rows(inputs: Mapping[str, np.ndarray], io: StageIO) -> tuple[np.ndarray, np.ndarray]:
    """The batch's sequence ids and past lengths, after the input names are checked."""
    _check_names(inputs, io)
    ids, past = inputs[SEQUENCE_IDS], inputs[PAST_LENGTHS]
    for name, a in ((SEQUENCE_IDS, ids), (PAST_LENGTHS, past)):
        if a.dtype != np.int64 or a.ndim != 1:
            raise ContractError(f"{name} must be INT64 with shape [batch]; got {a.dtype} {list(a.shape)}")
    B = ids.shape[0]
    if B == 0:
        raise ContractError(f"empty batch: {SEQUENCE_IDS} has no rows")
    if past.shape[0] != B:
        raise ContractError(f"{PAST_LENGTHS} has {past.shape[0]} rows, {SEQUENCE_IDS} {B}")
    if B > 1 and len(np.unique(ids)) != B:
        raise ContractError(f"{SEQUENCE_IDS} has duplicates: one row per sequence")
    if (past < 0).any():
        raise ContractError(f"{PAST_LENGTHS} must be >= 0")
    return ids, past


def _check_x(x: np.ndarray, io: StageIO, B: int) -> np.ndarray:
    want_dtype, want_ndim = (np.int64, 2) if io.first else (np.float32, 3)
    if x.dtype != want_dtype or x.ndim != want_ndim or x.shape[0] != B or x.shape[1] == 0:
        shape = "[batch, sequence]" if io.first else f"[batch, sequence, {io.hidden_size}]"
        raise ContractError(
            f"{io.x_name} must be {'INT64' if io.first else 'FP32'} {shape} with batch {B} and "
            f"sequence >= 1; got {x.dtype} {list(x.shape)}"
        )
    if io.first:
        if (x < 0).any() or (x >= io.vocab_size).any():
            raise ContractError(f"{INPUT_IDS} must be in [0, {io.vocab_size})")
        return x
    if x.shape[2] != io.hidden_size:
        raise ContractError(f"{io.x_name} last dimension must be {io.hidden_size}")
    if not np.isfinite(x).all():
        raise ContractError(f"{io.x_name} contains NaN or infinite values")
    return x


def _check_mask(mask: np.ndarray | None, B: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    if mask is None:
        return np.ones((B, S), dtype=np.int64), np.full(B, S, dtype=np.int64)
    if mask.dtype != np.int64 or mask.shape != (B, S):
        raise ContractError(
            f"{ATTENTION_MASK} must be INT64 [{B}, {S}] over the new positions; got "
            f"{mask.dtype} {list(mask.shape)}"
        )
    n_new = mask.sum(axis=1)  # (B,)
    # left padding only: each row is zeros then ones, with at least one real position
    if ((mask != 0) & (mask != 1)).any() or (n_new == 0).any() or (np.diff(mask, axis=1) < 0).any():
        raise ContractError(f"{ATTENTION_MASK} rows must be 0s (left padding) then at least one 1")
    return mask, n_new


def _flag(inputs: Mapping[str, np.ndarray], name: str, B: int) -> np.ndarray | None:
    a = inputs.get(name)
    if a is not None and (a.dtype != np.bool_ or a.shape != (B,)):
        raise ContractError(f"{name} must be BOOL [{B}]")
    return a
