"""Next-token choice on its own: greedy is argmax, top-k and top-p restrict the candidates, a seed
makes a row reproducible whatever batch it is in, logprobs come from the unmodified distribution."""

from __future__ import annotations

import numpy as np

from functions.last_inputs import Sampling
from functions.sampling import log_softmax, sample

V = 50


def params(B: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = -1) -> Sampling:
    return Sampling(
        np.full(B, temperature, np.float32),
        np.full(B, top_k, np.int64),
        np.full(B, top_p, np.float32),
        np.full(B, seed, np.int64),
    )


def logits(B: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, V)).astype(np.float32) * 3


def test_greedy_is_argmax_and_logprobs_are_exact() -> None:
    x = logits(4)
    tokens, lp = sample(x, params(4), np.arange(4), want_logprobs=True)
    assert tokens.tolist() == x.argmax(-1).tolist()
    expected = log_softmax(x.astype(np.float64))[np.arange(4), tokens]
    np.testing.assert_allclose(lp, expected, rtol=1e-6)
    assert sample(x, params(4), np.arange(4))[1] is None  # only when asked


def test_top_k_keeps_the_k_best() -> None:
    x = logits(1, seed=3)
    best3 = set(np.argsort(-x[0])[:3].tolist())
    seen = {int(sample(x, params(1, 1.0, top_k=3, seed=s), np.array([9]))[0][0]) for s in range(200)}
    assert seen <= best3 and len(seen) > 1


def test_top_p_keeps_the_nucleus() -> None:
    x = np.full((1, V), -20.0, dtype=np.float32)
    x[0, [4, 9, 11]] = [5.0, 4.0, 0.0]  # probabilities about 0.73, 0.27, 0.005
    seen = {int(sample(x, params(1, 1.0, top_p=0.9, seed=s), np.array([0]))[0][0]) for s in range(300)}
    assert seen == {4, 9}


def test_a_seeded_row_is_the_same_in_any_batch_and_position_matters() -> None:
    x = logits(3, seed=5)
    alone = sample(x[1:2], params(1, 1.0, seed=42), np.array([17]))[0][0]
    p = params(3, 1.0, seed=42)
    p.seed[0], p.seed[2] = 1, -1
    batch = sample(x, p, np.array([3, 17, 8]))[0]
    assert batch[1] == alone
    draws = {int(sample(x[1:2], params(1, 1.0, seed=42), np.array([pos]))[0][0]) for pos in range(40)}
    assert len(draws) > 1  # the stream moves on with the position: not the same token forever


def test_temperature_sharpens_towards_greedy() -> None:
    x = logits(1, seed=8)
    cold = {int(sample(x, params(1, 1e-4, seed=s), np.array([0]))[0][0]) for s in range(50)}
    assert cold == {int(x.argmax())}
