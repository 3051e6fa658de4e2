"""What a prompt must satisfy before it is queued: ids in the vocabulary, and a prompt plus
max_tokens that fits the stages' call bound, KV cache budget and the model's context window. Each
refusal is a 400 (or 413) that names the field and the bound.
"""

from __future__ import annotations

from gateway.call_inputs import StageLayout
from gateway.errors import InvalidRequestError, PayloadTooLargeError
from gateway.sequence import SamplingParams


def check_prompt(layout: StageLayout, ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
    if any(not 0 <= t < layout.vocab_size for t, _ in params.logit_bias):
        raise InvalidRequestError(
            f"logit_bias names a token id outside the vocabulary [0, {layout.vocab_size})",
            param="logit_bias",
        )
    if params.top_k > layout.vocab_size:
        raise InvalidRequestError(
            f"top_k must be at most the vocabulary size {layout.vocab_size}", param="top_k"
        )
    if not ids:
        raise InvalidRequestError(f"{param} is empty: it must contain at least one token", param=param)
    bad = [t for t in ids if not 0 <= t < layout.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {layout.vocab_size})", param=param
        )
    check_length(layout, len(ids), params.max_tokens, param)


def check_length(layout: StageLayout, prompt: int, max_tokens: int, param: str) -> None:
    if prompt > layout.max_batch_tokens:
        raise PayloadTooLargeError(
            f"the prompt has {prompt} tokens; the stages take at most {layout.max_batch_tokens} "
            "positions per call (TANDEM_MAX_BATCH_TOKENS)",
            param=param,
        )
    if prompt + max_tokens > layout.max_call_positions:
        raise PayloadTooLargeError(
            f"the prompt ({prompt} tokens) and max_tokens ({max_tokens}) need "
            f"{prompt + max_tokens} cached positions; the smallest stage KV cache holds "
            f"{layout.max_call_positions} (TANDEM_KV_CACHE_BYTES)",
            param="max_tokens",
        )
    if prompt + max_tokens > layout.max_positions:
        raise InvalidRequestError(
            f"this model's context window is {layout.max_positions} tokens; the prompt has {prompt} "
            f"and max_tokens asks for {max_tokens} more ({prompt + max_tokens}); shorten one",
            param="max_tokens",
        )
