"""What a stage answers from what its graph computed, before anything is stored (a refused request
changes nothing): the next stage's hidden states, or, for the last stage, from the logits at each
row's sampled position, the chosen token and its logprob, the logits themselves and the scoring
outputs, each computed only when the checked batch asks for it (functions.batch). Values that are
not finite are refused (400): no token can be chosen from them, the next stage would refuse them,
and JSON cannot carry them.
"""

from __future__ import annotations

import numpy as np

from functions import contract as c
from functions import processors
from functions.batch import StageBatch
from functions.contract import ContractError
from functions.sampling import sample
from functions.scoring import Head, score_outputs
from functions.stage_io import StageIO


def answer(
    io: StageIO,
    batch: StageBatch,
    y: np.ndarray,  # (B, S, C) hidden states, or (B, V) logits for the last stage
    hidden: np.ndarray | None,  # (B, S, C) final hidden states, when the batch scores positions
    head: Head | None,
) -> dict[str, np.ndarray]:
    """The outputs of one batch, exactly those `batch.outputs` names."""
    if io.last:
        return last_outputs(batch, y, hidden, head)
    broken = ~np.isfinite(y).all(axis=(1, 2))  # (B,)
    if broken.any():
        raise ContractError(
            f"sequence(s) {batch.sequence_ids[broken].tolist()}: the hidden states this stage computes "
            "are not finite (its inputs are beyond what this model computes in float32)"
        )
    return {io.y_name: y}


def last_outputs(
    batch: StageBatch,
    logits: np.ndarray,  # (B, V) float32 at each row's last position
    hidden: np.ndarray | None,  # (B, S, C) final hidden states, when the batch scores positions
    head: Head | None,
) -> dict[str, np.ndarray]:
    """Exactly the outputs `batch.outputs` names; ContractError when no token can be chosen."""
    assert batch.sampling is not None  # the batch check parses it for the last stage
    check_finite(batch, logits)
    chosen_from = logits if batch.processors is None else processors.apply(logits, batch.processors)
    positions = batch.past_lengths + batch.n_new  # (B,) of the token being chosen
    token_ids, logprobs = sample(chosen_from, batch.sampling, positions, batch.wants(c.LOGPROBS), logits)
    out = {c.TOKEN_IDS: token_ids, c.LOGITS: logits}
    if logprobs is not None:
        out[c.LOGPROBS] = logprobs
    if batch.scoring is not None:
        out |= score_outputs(batch.scoring, logits, hidden, head, batch.outputs)
    missing = batch.outputs - out.keys()
    if missing:  # the batch check refuses what cannot be computed: this is a bug, not a bad request
        raise RuntimeError(f"the last stage computed no {sorted(missing)}")
    return {name: out[name] for name in batch.outputs}


def check_finite(batch: StageBatch, logits: np.ndarray) -> None:
    """Every row needs finite logits: a greedy argmax over NaN is no choice either."""
    broken = ~np.isfinite(logits).all(axis=1)  # (B,)
    if broken.any():
        raise ContractError(
            f"sequence(s) {batch.sequence_ids[broken].tolist()}: the logits are not finite (the hidden "
            "states are beyond what this model computes in float32), so no token can be chosen"
        )
