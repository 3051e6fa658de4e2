"""The last stage's logits processors against straightforward formulations: HF transformers'
repetition penalty, OpenAI's documented presence/frequency formula written as a loop, logit_bias as
a dense add, banned ids; and the checks that refuse bad inputs with a message naming the tensor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from functions import processors
from functions.contract import ContractError
from functions.last_inputs import parse_processors

V = 50


FLOATS = {"presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias_values"}


def inputs(**kw: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32 if k in FLOATS else np.int64) for k, v in kw.items()}


def test_no_processor_input_means_none_and_no_copy() -> None:
    assert parse_processors({}, 2, V) is None
    logits = np.zeros((2, V), np.float32)
    p = parse_processors(inputs(presence_penalty=[0.0, 0.0]), 2, V)
    assert p is not None
    assert processors.apply(logits, p) is logits  # nothing to change: the same array


def test_repetition_penalty_equals_transformers() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    seen = [[1, 4, 4, 9, 30], [2, 2, 2, -1, -1], [7, 8, -1, -1, -1]]
    rep = [1.3, 0.7, 1.0]
    p = parse_processors(
        inputs(repetition_penalty=rep, penalty_token_ids=seen, penalty_prompt_lengths=[2, 0, 2]), 3, V
    )
    assert p is not None
    out = processors.apply(logits, p)
    for b in range(3):
        ids = torch.tensor([[t for t in seen[b] if t >= 0]])
        want = RepetitionPenaltyLogitsProcessor(penalty=rep[b])(ids, torch.tensor(logits[b : b + 1]))
        np.testing.assert_allclose(out[b], want[0].numpy(), rtol=1e-6)


def test_presence_and_frequency_count_generated_tokens_only() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, V)).astype(np.float32)
    tokens = [[3, 3, 5, 5, 5, 6], [10, 11, 11, -1, -1, -1]]
    prompt_lengths = [2, 1]  # row 0: 3, 3 are prompt; row 1: 10 is prompt
    presence, frequency = [0.5, -1.0], [0.25, 2.0]
    p = parse_processors(
        inputs(
            presence_penalty=presence,
            frequency_penalty=frequency,
            penalty_token_ids=tokens,
            penalty_prompt_lengths=prompt_lengths,
        ),
        2,
        V,
    )
    assert p is not None
    out = processors.apply(logits, p)
    want = logits.astype(np.float64).copy()
    for b in range(2):
        generated = [t for t in tokens[b][prompt_lengths[b] :] if t >= 0]
        for t in set(generated):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
            want[b, t] -= generated.count(t) * frequency[b] + presence[b]
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_logit_bias_adds_and_banned_ids_never_win() -> None:
    logits = np.zeros((2, V), np.float32)
    p = parse_processors(
        inputs(
            logit_bias_ids=[[4, 9], [1, -1]],
            logit_bias_values=[[100.0, -5.5], [2.0, 0.0]],
            banned_token_ids=[[-1], [1]],
        ),
        2,
        V,
    )
    assert p is not None
    out = processors.apply(logits, p)
    want = np.zeros((2, V), np.float32)
    want[0, 4], want[0, 9] = 100.0, -5.5
    want[1, 1] = -np.inf  # its bias does not lift a banned id
    np.testing.assert_array_equal(out, want)
    assert np.all(logits == 0)  # the model's logits stay as they were (logprobs use them)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"presence_penalty": [2.5]}, "presence_penalty"),
        ({"frequency_penalty": [float("nan")]}, "frequency_penalty"),
        ({"repetition_penalty": [0.0]}, "repetition_penalty"),
        ({"penalty_token_ids": [[V]]}, "penalty_token_ids"),
        ({"penalty_token_ids": [[-2]]}, "penalty_token_ids"),
        ({"penalty_token_ids": [1]}, "penalty_token_ids"),
        ({"penalty_token_ids": [[1]], "penalty_prompt_lengths": [2]}, "penalty_prompt_lengths"),
        ({"logit_bias_ids": [[1, 2]], "logit_bias_values": [[1.0]]}, "logit_bias_values"),
        ({"logit_bias_ids": [[1]], "logit_bias_values": [[100.5]]}, "logit_bias_values"),
        ({"banned_token_ids": [[V + 3]]}, "banned_token_ids"),
    ],
)
def test_bad_inputs_name_the_tensor(given: dict[str, Any], named: str) -> None:
    with pytest.raises(ContractError, match=named):
        parse_processors(inputs(**given), 1, V)


def test_banning_every_token_is_refused() -> None:
    p = parse_processors(inputs(banned_token_ids=[list(range(V))]), 1, V)
    assert p is not None
    with pytest.raises(ContractError, match="banned_token_ids"):
        processors.apply(np.zeros((1, V), np.float32), p)
