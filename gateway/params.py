"""Request parameters checked once, for a 400 that names the field (the stage checks its inputs
again): the sampling parameters of every route, and the choices per prompt (`n`, `best_of`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from functions import contract
from gateway.errors import InvalidRequestError
from gateway.sequence import SamplingParams

T = TypeVar("T")
MAX_CHOICES = 128  # n and best_of, per prompt (OpenAI's bound on n)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias per request

REPETITION_MIN = 1e-6  # repetition_penalty's floor (1 = off)


def sampling_from(
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: list[str],
    ignore_eos: bool,
    logprobs: bool,
    *,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[str, float] | None = None,
    min_tokens: int = 0,
    top_logprobs: int = 0,
    echo: bool = False,
) -> SamplingParams:
    """Validated sampling parameters (the stage re-checks them; here they get a friendly 400).
    With `echo` and `logprobs` the prompt is scored too, and max_tokens may be 0 (score only)."""
    if max_tokens < (0 if echo else 1):
        least = "0 (with echo)" if echo else "1 (0 only with echo)"
        raise InvalidRequestError(
            f"max_tokens must be at least {least}, got {max_tokens}", param="max_tokens"
        )
    if not 0 <= top_logprobs <= contract.TOP_LOGPROBS_MAX:
        raise InvalidRequestError(
            f"logprobs must be between 0 and {contract.TOP_LOGPROBS_MAX}, got {top_logprobs}",
            param="logprobs",
        )
    if top_k < -1:
        raise InvalidRequestError(f"top_k must be -1 or 0 (off) or positive, got {top_k}", param="top_k")
    # the vocabulary bound on top_k is checked per prompt (Gateway.check_prompt) once the model is known
    problem = contract.sampling_problem(temperature, 0, top_p, vocab_size=0)
    if problem is not None:
        raise InvalidRequestError(problem[1], param=problem[0])
    if len(stop) > 4 or any(not isinstance(s, str) or s == "" for s in stop):
        raise InvalidRequestError("stop takes up to 4 non-empty strings", param="stop")
    if seed is not None and not 0 <= seed < contract.SEED_LIMIT:
        raise InvalidRequestError("seed must be in [0, 2**62)", param="seed")
    _check_penalties(presence_penalty, frequency_penalty, repetition_penalty)
    if not 0 <= min_tokens <= max_tokens:
        raise InvalidRequestError(
            f"min_tokens must be in [0, max_tokens = {max_tokens}], got {min_tokens}", param="min_tokens"
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs if logprobs else 0,
        score_prompt=echo and logprobs,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logit_bias=_logit_bias(logit_bias or {}),
        min_tokens=min_tokens,
    )


def _check_penalties(presence: float, frequency: float, repetition: float) -> None:
    m = contract.PENALTY_MAX
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not (math.isfinite(value) and -m <= value <= m):
            raise InvalidRequestError(f"{name} must be in [{-m:g}, {m:g}], got {value}", param=name)
    # the stage gets it as float32: a positive value too small for that would arrive as 0
    if not (math.isfinite(repetition) and REPETITION_MIN <= repetition <= 1e6):
        raise InvalidRequestError(
            f"repetition_penalty must be in [{REPETITION_MIN:g}, 1e6] (1 = off), got {repetition}",
            param="repetition_penalty",
        )


def _logit_bias(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (a string) to a bias in [-100, 100], as (id, bias) pairs sorted by
    id; the ids' vocabulary bound is checked per prompt (Gateway.check_prompt)."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias"
        )
    lim = contract.LOGIT_BIAS_MAX
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit():
            raise InvalidRequestError(
                f"logit_bias keys are token ids (decimal strings), got {key!r}", param="logit_bias"
            )
        if not (math.isfinite(value) and -lim <= value <= lim):
            raise InvalidRequestError(
                f"logit_bias values must be in [{-lim:g}, {lim:g}], got {value} for token {key}",
                param="logit_bias",
            )
        if int(key) in out:
            raise InvalidRequestError(f"logit_bias names token {int(key)} twice", param="logit_bias")
        out[int(key)] = float(value)
    return tuple(sorted(out.items()))


def choices_from(n: int, best_of: int | None, stream: bool) -> tuple[int, int]:
    """(choices returned, sequences generated) per prompt: `n`, and `best_of` (default n), the
    candidates of which the n with the highest cumulative logprob are returned."""
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be in [1, {MAX_CHOICES}], got {n}", param="n")
    generated = n if best_of is None else best_of
    if not n <= generated <= MAX_CHOICES:
        raise InvalidRequestError(
            f"best_of must be in [n = {n}, {MAX_CHOICES}], got {best_of}", param="best_of"
        )
    if stream and generated > n:
        raise InvalidRequestError("best_of > n cannot be streamed (as in OpenAI's API)", param="best_of")
    return n, generated


def best(outs: list[T], n: int, generated: int, score: Callable[[T], float]) -> list[T]:
    """The n of each prompt's `generated` outcomes (they come prompt by prompt) with the highest
    score, the cumulative logprob for best_of (ties keep their order); all when generated == n."""
    if generated == n:
        return outs
    picked: list[T] = []
    for p in range(0, len(outs), generated):
        picked += sorted(outs[p : p + generated], key=lambda o: -score(o))[:n]
    return picked
