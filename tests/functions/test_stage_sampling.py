"""Sampling in the last stage: seeded and reproducible whatever the batch, greedy = argmax of the
logits, logprobs from the unmodified distribution."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.stage_calls import N_EMBD, VOCAB, Stages, held, hidden_inputs, infer, new_id, outputs_of

pytestmark = pytest.mark.processes


def _sampled(
    stages: Stages,
    x: np.ndarray,
    temperature: list[float],
    top_k: list[int],
    seed: list[int],
    outputs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    ids = [new_id() for _ in range(len(x))]
    inputs = hidden_inputs("hidden_states_4", ids, x)
    inputs |= {
        "temperature": np.array(temperature, np.float32),
        "top_k": np.array(top_k, np.int64),
        "top_p": np.ones(len(x), np.float32),
        "seed": np.array(seed, np.int64),
        "sequence_end": np.ones(len(x), bool),
    }
    out = outputs_of(infer(stages, "stage-3", inputs, outputs=outputs))
    assert set(ids).isdisjoint(held(stages, "stage-3"))  # sequence_end: nothing stays behind
    return out


def test_seeded_sampling_is_reproducible_in_any_batch(stages: Stages) -> None:
    rng = np.random.default_rng(5)
    row = rng.standard_normal((1, 4, N_EMBD)).astype(np.float32)
    alone = int(_sampled(stages, row, [0.8], [50], [1234])["token_ids"][0])
    assert int(_sampled(stages, row, [0.8], [50], [1234])["token_ids"][0]) == alone
    others = rng.standard_normal((2, 4, N_EMBD)).astype(np.float32)
    batch = np.concatenate([others[:1], row, others[1:]])
    out = _sampled(stages, batch, [1.0, 0.8, 0.0], [0, 50, 0], [7, 1234, -1])
    assert int(out["token_ids"][1]) == alone
    # it is sampling, not argmax: different seeds give different tokens
    tokens = {int(_sampled(stages, row, [0.8], [50], [s])["token_ids"][0]) for s in range(12)}
    assert len(tokens) > 1, tokens


def test_temperature_zero_is_argmax_of_logits(stages: Stages) -> None:
    x = np.random.default_rng(8).standard_normal((3, 5, N_EMBD)).astype(np.float32)
    out = _sampled(stages, x, [0.0] * 3, [0] * 3, [-1] * 3, outputs=["token_ids", "logprobs", "logits"])
    logits = out["logits"]
    assert logits.shape == (3, VOCAB)
    np.testing.assert_array_equal(out["token_ids"], logits.argmax(axis=-1))
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    logprobs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(
        out["logprobs"], logprobs[np.arange(3), out["token_ids"]], rtol=1e-5, atol=1e-5
    )
    # logits are never sent unless asked
    assert "logits" not in _sampled(stages, x, [0.0] * 3, [0] * 3, [-1] * 3)
