"""The stage batch contract: every name, shape and bound that the export, the stage functions, the
gateway and the tests must agree on, in one place (standard library and numpy only).

A batch sent to a stage (B rows, S new positions, left-padded):
  sequence_ids (B,) int64, past_lengths (B,) int64: positions the caller believes the stage caches,
  input_ids (B, S) int64 (first stage) or hidden_states_{first layer} (B, S, C) float32,
  attention_mask (B, S) int64 over the new positions only (0 = left padding, then 1s),
  sequence_end (B,) bool: free the row's KV cache after this call;
  sequence_start (B,) bool: the row starts its sequence over (past_lengths 0) although the stage
    may hold it: without it, a past_lengths 0 row for a held sequence is a 409, so no caller
    replaces a sequence's KV cache by mistake;
  last stage only: temperature, top_p (B,) float32, top_k, seed (B,) int64; optionally the logits
    processors' inputs (functions.processors): penalties (B,) float32 with penalty_token_ids (B, L)
    and penalty_prompt_lengths (B,), logit_bias_ids / _values (B, K), banned_token_ids (B, K).
The last stage answers token_ids (B,) int64 (+ logprobs (B,) float32, logits (B, V) when asked);
the others hidden_states_{next layer} (B, S, C). A row whose past length is not what the stage holds
gets a 409 whose body names the rows and the lengths held (`conflict_extra` / `parse_conflict`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from functions.protocol import DATATYPES

# ---- tensor names on the wire ----
SEQUENCE_IDS = "sequence_ids"
PAST_LENGTHS = "past_lengths"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"  # inside the ONNX graphs only: the stage derives it from past_lengths
SEQUENCE_END = "sequence_end"
SEQUENCE_START = "sequence_start"
TOKEN_IDS = "token_ids"
LOGPROBS = "logprobs"
LOGITS = "logits"
TEMPERATURE = "temperature"
TOP_K = "top_k"
TOP_P = "top_p"
SEED = "seed"
# last stage, optional, sent only for rows that use them (functions.processors)
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
REPETITION_PENALTY = "repetition_penalty"
PENALTY_TOKEN_IDS = "penalty_token_ids"
PENALTY_PROMPT_LENGTHS = "penalty_prompt_lengths"
LOGIT_BIAS_IDS = "logit_bias_ids"
LOGIT_BIAS_VALUES = "logit_bias_values"
BANNED_TOKEN_IDS = "banned_token_ids"
HIDDEN_STATES_PREFIX = "hidden_states_"
# ---- scoring (last stage, asked per row; see functions/scoring.py) ----
FINAL_HIDDEN = "final_hidden_states"  # last stage graph: (B, S, C) before the final norm, every position
NUM_TOP = "num_top_logprobs"  # (B,) int64 in [0, TOP_LOGPROBS_MAX]: alternatives wanted per row
TOP_IDS = "top_token_ids"  # (B, K): the K most likely tokens at the sampled position
TOP_LOGPROBS = "top_logprobs"  # (B, K)
TARGET_IDS = "target_ids"  # (B, S) int64 beside the new positions: score this next token (-1: don't)
TARGET_LOGPROBS = "target_logprobs"  # (N,) for the N positions with a target, row-major
TARGET_TOP_IDS = "target_top_token_ids"  # (N, K)
TARGET_TOP_LOGPROBS = "target_top_logprobs"  # (N, K)
HEAD_HIDDEN = "hidden"  # the head graph's inputs: (N, C) final hidden states and (N,) targets
HEAD_FILE = "head.onnx"  # final norm + LM head (+ soft-cap) + log_softmax + top-k, on the positions asked
TOP_LOGPROBS_MAX = 5  # as OpenAI's legacy completions API

# ---- the 409 body (RFC 9457 extension members) ----
HELD_LENGTHS = "held_lengths"

# ---- HTTP ----
# the tokenizer function's end-of-sequence ids, comma-separated (Llama 3 has several), on GET /v1/tokenizer
EOS_HEADER = "Tandem-Eos-Token-Ids"

# ---- sampling bounds (the gateway checks them for a friendly 400, the stage again) ----
TEMPERATURE_MAX = 100.0
# The smallest top_p that survives the float32 trip to the stage (a smaller one becomes 0).
TOP_P_MIN = float(np.finfo(np.float32).tiny)
SEED_LIMIT = 2**62  # seeds are in [0, SEED_LIMIT); a negative seed on the wire means "fresh entropy"


class ContractError(ValueError):
    """A batch breaks the contract; the message says which tensor and how (the stage answers 400)."""


def hidden_states(layer: int) -> str:
    """The tensor entering layer `layer` (a stage's input, or its predecessor's output)."""
    return f"{HIDDEN_STATES_PREFIX}{layer}"


PAST_PREFIX = "past_key_values."  # past_key_values.{layer}.key / .value: a stage graph's KV inputs
PRESENT_PREFIX = "present."  # present.{layer}.key / .value: its KV outputs


def past_key_values(layer: int, kv: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kv}"


def present(layer: int, kv: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kv}"


def stage_name(k: int) -> str:
    """The one name of stage k (1-based) everywhere: model name, service, span and metric label."""
    return f"stage-{k}"


def stage_file(k: int) -> str:
    return f"stage{k}.onnx"


def normalize_stage_name(value: str) -> str:
    """'2' or 'stage-2' -> 'stage-2'."""
    return stage_name(int(value)) if value.isdigit() else value


def data_input(names: Sequence[str]) -> str:
    """Which of a stage's input names carries the data (input_ids or hidden_states_k)."""
    found = [n for n in names if n == INPUT_IDS or n.startswith(HIDDEN_STATES_PREFIX)]
    if len(found) != 1:
        raise ContractError(f"expected exactly one data input among {list(names)}, found {found}")
    return found[0]


@dataclass(frozen=True)
class SamplingParam:
    name: str
    dtype: type[np.generic]
    datatype: str  # Open Inference Protocol name
    default: float | int


SAMPLING = (
    SamplingParam(TEMPERATURE, np.float32, "FP32", 0.0),
    SamplingParam(TOP_K, np.int64, "INT64", 0),
    SamplingParam(TOP_P, np.float32, "FP32", 1.0),
    SamplingParam(SEED, np.int64, "INT64", -1),
)


# the optional logits processors' inputs: name, datatype, rank ([-1] padding in the id tensors)
PROCESSOR_INPUTS = (
    (PRESENCE_PENALTY, "FP32", 1),
    (FREQUENCY_PENALTY, "FP32", 1),
    (REPETITION_PENALTY, "FP32", 1),
    (PENALTY_TOKEN_IDS, "INT64", 2),
    (PENALTY_PROMPT_LENGTHS, "INT64", 1),
    (LOGIT_BIAS_IDS, "INT64", 2),
    (LOGIT_BIAS_VALUES, "FP32", 2),
    (BANNED_TOKEN_IDS, "INT64", 2),
)
PENALTY_MAX = 2.0  # presence and frequency penalties are in [-PENALTY_MAX, PENALTY_MAX] (OpenAI)
LOGIT_BIAS_MAX = 100.0  # a logit bias is in [-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX] (OpenAI)


def sampling_problem(temperature: float, top_k: int, top_p: float, vocab_size: int) -> tuple[str, str] | None:
    """(parameter, message) for the first sampling value out of bounds, or None when all are fine."""
    if not np.isfinite(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
        return TEMPERATURE, f"temperature must be between 0 and {TEMPERATURE_MAX:g}, got {temperature}"
    if not 0 <= top_k <= vocab_size:
        return TOP_K, f"top_k must be in [0, {vocab_size}] (0 = off), got {top_k}"
    if not np.isfinite(top_p) or not TOP_P_MIN <= top_p <= 1:
        return TOP_P, f"top_p must be in (0, 1] and at least {TOP_P_MIN:.3g}, got {top_p}"
    return None


@dataclass(frozen=True)
class StageIO:
    """What one stage takes and returns: enough to describe it (model metadata) and check a batch."""

    x_name: str  # input_ids or hidden_states_{first layer}
    y_name: str  # hidden_states_{next layer}, or logits for the last stage (inside the graph)
    first: bool
    last: bool
    hidden_size: int  # the hidden states' width between stages
    vocab_size: int
    max_positions: int  # the context window
    scoring: bool = False  # last stage with the scoring head: takes target_ids

    def wire_inputs(self) -> list[dict[str, Any]]:
        x = ([-1, -1], "INT64") if self.first else ([-1, -1, self.hidden_size], "FP32")
        spec: list[tuple[str, str, list[int]]] = [
            (SEQUENCE_IDS, "INT64", [-1]),
            (PAST_LENGTHS, "INT64", [-1]),
            (self.x_name, x[1], x[0]),
            (ATTENTION_MASK, "INT64", [-1, -1]),
            (SEQUENCE_END, "BOOL", [-1]),
            (SEQUENCE_START, "BOOL", [-1]),
        ]
        if self.last:
            spec += [(p.name, p.datatype, [-1]) for p in SAMPLING]
            spec += [(n, d, [-1] * rank) for n, d, rank in PROCESSOR_INPUTS]
            spec += [(NUM_TOP, "INT64", [-1])] + ([(TARGET_IDS, "INT64", [-1, -1])] if self.scoring else [])
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in spec]

    @functools.cached_property
    def input_names(self) -> frozenset[str]:
        """The names `wire_inputs` lists, built once (every call checks against them)."""
        return frozenset(t["name"] for t in self.wire_inputs())

    @functools.cached_property
    def output_names(self) -> frozenset[str]:
        """The names `wire_outputs` lists, built once."""
        return frozenset(t["name"] for t in self.wire_outputs())

    def wire_outputs(self) -> list[dict[str, Any]]:
        if self.last:
            return [
                {"name": TOKEN_IDS, "datatype": "INT64", "shape": [-1]},
                {"name": LOGPROBS, "datatype": "FP32", "shape": [-1]},
                {"name": LOGITS, "datatype": "FP32", "shape": [-1, self.vocab_size]},
                {"name": TOP_IDS, "datatype": "INT64", "shape": [-1, -1]},
                {"name": TOP_LOGPROBS, "datatype": "FP32", "shape": [-1, -1]},
            ] + (self._scoring_outputs() if self.scoring else [])
        return [{"name": self.y_name, "datatype": "FP32", "shape": [-1, -1, self.hidden_size]}]

    def answer_bytes(self, rows: int, width: int, names: Iterable[str] | None) -> int:
        """Tensor bytes of an answer with these outputs (None: the first, the default) for a batch
        of `rows` x `width` new positions: a variable dimension is the rows, then the positions."""
        sizes = self._output_sizes
        wanted = [next(iter(sizes.values()))] if names is None else [sizes[n] for n in names if n in sizes]
        total = 0
        for shape, itemsize in wanted:
            dims = [d if d >= 0 else (rows if i == 0 else width) for i, d in enumerate(shape)]
            total += math.prod(dims) * itemsize
        return total

    @functools.cached_property
    def _output_sizes(self) -> dict[str, tuple[list[int], int]]:
        """Each output's wire shape and item size, built once (answer_bytes runs on every call)."""
        return {o["name"]: (o["shape"], DATATYPES[o["datatype"]].itemsize) for o in self.wire_outputs()}

    @staticmethod
    def _scoring_outputs() -> list[dict[str, Any]]:
        return [
            {"name": TARGET_LOGPROBS, "datatype": "FP32", "shape": [-1]},
            {"name": TARGET_TOP_IDS, "datatype": "INT64", "shape": [-1, -1]},
            {"name": TARGET_TOP_LOGPROBS, "datatype": "FP32", "shape": [-1, -1]},
        ]


@dataclass(frozen=True)
class Sampling:
    """Per-row sampling parameters of a last-stage batch."""

    temperature: np.ndarray  # (B,) float32, 0 = greedy
    top_k: np.ndarray  # (B,) int64, 0 = off
    top_p: np.ndarray  # (B,) float32, 1 = off
    seed: np.ndarray  # (B,) int64, < 0 = fresh entropy


@dataclass(frozen=True)
class StageBatch:
    """A checked batch, as the stage engine runs it."""

    sequence_ids: np.ndarray  # (B,) int64, unique
    past_lengths: np.ndarray  # (B,) int64 >= 0
    x: np.ndarray  # (B, S) int64 or (B, S, C) float32
    mask: np.ndarray  # (B, S) int64, each row 0s then at least one 1
    n_new: np.ndarray  # (B,) int64: real new positions per row
    end: np.ndarray | None  # (B,) bool
    sampling: Sampling | None  # last stage only
    start: np.ndarray | None = None  # (B,) bool: restart these rows (past_lengths must be 0)

    @property
    def size(self) -> int:
        return int(self.sequence_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def from_tensors(cls, inputs: Mapping[str, np.ndarray], io: StageIO) -> StageBatch:
        """Check decoded wire tensors against the contract; raises ContractError saying what is wrong."""
        allowed = io.input_names
        if not allowed.issuperset(inputs):
            unknown = sorted(set(inputs) - allowed)
            raise ContractError(f"unknown input tensor(s) {unknown}; this stage takes {sorted(allowed)}")
        for req in (SEQUENCE_IDS, PAST_LENGTHS, io.x_name):
            if req not in inputs:
                raise ContractError(f"missing input tensor {req!r}")
        ids, past, x = inputs[SEQUENCE_IDS], inputs[PAST_LENGTHS], inputs[io.x_name]
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
        _check_x(x, io, B)
        S = x.shape[1]
        mask, n_new = _check_mask(inputs.get(ATTENTION_MASK), B, S)
        too_long = past + n_new > io.max_positions
        if too_long.any():
            b = int(np.argmax(too_long))
            raise ContractError(
                f"sequence {int(ids[b])} would reach position {int(past[b] + n_new[b])}, "
                f"beyond the context window of {io.max_positions}"
            )
        end = inputs.get(SEQUENCE_END)
        if end is not None and (end.dtype != np.bool_ or end.shape != (B,)):
            raise ContractError(f"{SEQUENCE_END} must be BOOL [{B}]")
        start = inputs.get(SEQUENCE_START)
        if start is not None and (start.dtype != np.bool_ or start.shape != (B,)):
            raise ContractError(f"{SEQUENCE_START} must be BOOL [{B}]")
        if start is not None and (start & (past != 0)).any():
            raise ContractError(f"{SEQUENCE_START} rows must have {PAST_LENGTHS} 0")
        sampling = _check_sampling(inputs, B, io.vocab_size) if io.last else None
        return cls(ids, past, x, mask, n_new, end, sampling, start)


def _check_x(x: np.ndarray, io: StageIO, B: int) -> None:
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
        return
    if x.shape[2] != io.hidden_size:
        raise ContractError(f"{io.x_name} last dimension must be {io.hidden_size}")
    if not np.isfinite(x).all():
        raise ContractError(f"{io.x_name} contains NaN or infinite values")


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


def _check_sampling(inputs: Mapping[str, np.ndarray], B: int, vocab_size: int) -> Sampling:
    values: dict[str, np.ndarray] = {}
    for p in SAMPLING:
        a = inputs.get(p.name)
        if a is None:
            a = np.full(B, p.default, dtype=p.dtype)
        elif a.dtype != p.dtype or a.shape != (B,):
            raise ContractError(f"{p.name} must be {p.datatype} [{B}]")
        values[p.name] = a
    s = Sampling(**values)
    t, k, top_p = s.temperature, s.top_k, s.top_p
    if not np.isfinite(t).all() or (t < 0).any() or (t > TEMPERATURE_MAX).any():
        raise ContractError(f"{TEMPERATURE} must be finite and in [0, {TEMPERATURE_MAX:g}]")
    if (k < 0).any() or (k > vocab_size).any():
        raise ContractError(f"{TOP_K} must be in [0, {vocab_size}] (0 = off)")
    if not np.isfinite(top_p).all() or (top_p <= 0).any() or (top_p > 1).any():
        raise ContractError(f"{TOP_P} must be in (0, 1]")
    return s


def left_pad(rows: Sequence[np.ndarray], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths stacked and left-padded: (B, S) int64 token ids from (n,) rows, or
    (B, S, C) float32 states from (n, C) rows; with the (B, S) int64 attention mask (0 = padding)."""
    B, S = len(rows), max(len(r) for r in rows)
    mask = np.zeros((B, S), dtype=np.int64)  # (B, S)
    if width is None:
        x = np.zeros((B, S), dtype=np.int64)  # (B, S)
    else:
        x = np.zeros((B, S, width), dtype=np.float32)  # (B, S, C)
    for b, r in enumerate(rows):
        if len(r):
            x[b, S - len(r) :] = r
            mask[b, S - len(r) :] = 1
    return x, mask


def conflict_extra(ids: np.ndarray, held: np.ndarray, past: np.ndarray) -> dict[str, list[int]]:
    """The 409 body's extension members for the rows in conflict."""
    return {SEQUENCE_IDS: ids.tolist(), HELD_LENGTHS: held.tolist(), PAST_LENGTHS: past.tolist()}


def parse_conflict(body: Any) -> dict[int, int]:
    """Sequence id -> positions the stage holds, from a 409 body; ContractError if unreadable."""
    try:
        ids, held = body[SEQUENCE_IDS], body[HELD_LENGTHS]
        out = {int(s): int(h) for s, h in zip(ids, held, strict=True)}
    except (KeyError, TypeError, ValueError) as e:
        raise ContractError(f"a 409 body must carry {SEQUENCE_IDS} and {HELD_LENGTHS}: {e}") from None
    return out
