"""What the last stage answers from the logits at each row's sampled position: the finite check, the
logits processors, the chosen token and its logprob, the logits themselves and the scoring outputs,
each computed only when the checked batch asks for it (functions.batch).
"""

from __future__ import annotations

import numpy as np

from functions import contract as c
from functions import processors
from functions.batch import StageBatch
from functions.contract import ContractError
from functions.sampling import sample
from functions.scoring import Head, score_outputs


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
    """Rows that sample need finite logits (greedy rows take the argmax of whatever there is)."""
    assert batch.sampling is not None
    hot = np.nonzero(batch.sampling.temperature > 0)[0]
    broken = [int(batch.sequence_ids[b]) for b in hot if not np.isfinite(logits[b]).all()]
    if broken:
        raise ContractError(
            f"sequence(s) {broken}: the logits are not finite (the hidden states are beyond "
            "what this model computes in float32), so no token can be sampled"
        )
