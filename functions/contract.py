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
    and penalty_prompt_lengths (B,), logit_bias_ids / _values (B, K), banned_token_ids (B, K);
    and the scoring inputs num_top_logprobs (B,), target_ids (B, S) (functions.scoring).
The last stage answers token_ids (B,) int64 and logprobs (B,) float32 by default, and any output it
lists when asked (logits (B, V); top_* and target_* only with the input they need, OUTPUT_NEEDS);
the others hidden_states_{next layer} (B, S, C). A row whose past length is not what the stage holds
gets a 409 whose body names the rows and the lengths held (`conflict_extra` / `parse_conflict`).
What a stage takes and returns is `functions.stage_io`; a batch is checked by `functions.batch`;
the stage's HTTP paths and JSON bodies are `functions.stage_api`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
# Last-stage outputs computed only when the request sends the input that says what to compute:
# output -> that input (functions.batch answers 400 naming both when it is absent). num_top_logprobs
# also sets K of target_top_* (0 when absent); token_ids, logprobs and logits can always be computed.
OUTPUT_NEEDS = {
    TOP_IDS: NUM_TOP,
    TOP_LOGPROBS: NUM_TOP,
    TARGET_LOGPROBS: TARGET_IDS,
    TARGET_TOP_IDS: TARGET_IDS,
    TARGET_TOP_LOGPROBS: TARGET_IDS,
}
NEEDED_INPUTS = {  # what each input of OUTPUT_NEEDS is, for the 400 that asks for it
    NUM_TOP: f"INT64 [batch]: the alternatives wanted per row, 0 to {TOP_LOGPROBS_MAX}",
    TARGET_IDS: "INT64 [batch, sequence]: the token to score after each new position, -1 for none",
}

# ---- the 409 body (RFC 9457 extension members) ----
HELD_LENGTHS = "held_lengths"

# ---- HTTP ----
# the tokenizer function's end-of-sequence ids, comma-separated (Llama 3 has several), on GET /v1/tokenizer
EOS_HEADER = "Tandem-Eos-Token-Ids"
# the tokenizer function's chat template and special tokens' strings (functions.tokenizer), for the gateway
CHAT_TEMPLATE_PATH = "/v1/chat_template"

# ---- sampling bounds (the gateway checks them for a friendly 400, the stage again) ----
TEMPERATURE_MAX = 100.0
# The smallest top_p that survives the float32 trip to the stage (a smaller one becomes 0).
TOP_P_MIN = float(np.finfo(np.float32).tiny)
SEED_LIMIT = 2**62  # seeds are in [0, SEED_LIMIT); a negative seed on the wire means "fresh entropy"


class ContractError(ValueError):
    """A batch breaks the contract; the message says which tensor and how (the stage answers 400)."""


def eos_header(ids: Sequence[int]) -> dict[str, str]:
    """The EOS_HEADER that carries these ids (no header for none)."""
    return {EOS_HEADER: ",".join(str(i) for i in ids)} if ids else {}


def parse_eos_header(value: str | None) -> list[int]:
    """The ids an EOS_HEADER carries; ContractError when it is not comma-separated token ids."""
    try:
        return [int(i) for i in (value or "").split(",") if i.strip()]
    except ValueError:
        raise ContractError(f"{EOS_HEADER} must be comma-separated token ids, got {value!r}") from None


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
