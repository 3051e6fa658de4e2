"""The last stage's logits-processor inputs for a batch (functions.processors): sent only when some
row uses a penalty, logit_bias or min_tokens, so a plain decode step carries nothing more. The
stage keeps no state for them: every call sends what the row needs, so a replay or a failover to
another replica chooses the same way."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from functions import contract as c
from gateway.sequence import Sequence


def _padded(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)  # (B, L)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def processor_inputs(grp: Seq[Sequence], eos: Seq[int]) -> dict[str, np.ndarray]:
    """Per-row tensors for the rows of `grp`; rows that use nothing get neutral values."""
    params = [s.params for s in grp]
    inputs: dict[str, np.ndarray] = {}
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        tokens, prompt_lengths = [], []
        for s in grp:
            p = s.params
            if p.repetition_penalty != 1.0:  # counts the prompt too
                tokens.append(s.tokens)
                prompt_lengths.append(len(s.prompt))
            elif p.presence_penalty or p.frequency_penalty:  # generated tokens only
                tokens.append(s.tokens[len(s.prompt) :])
                prompt_lengths.append(0)
            else:
                tokens.append([])
                prompt_lengths.append(0)
        inputs |= {
            c.PRESENCE_PENALTY: np.array([p.presence_penalty for p in params], dtype=np.float32),
            c.FREQUENCY_PENALTY: np.array([p.frequency_penalty for p in params], dtype=np.float32),
            c.REPETITION_PENALTY: np.array([p.repetition_penalty for p in params], dtype=np.float32),
            c.PENALTY_TOKEN_IDS: _padded(tokens),
            c.PENALTY_PROMPT_LENGTHS: np.array(prompt_lengths, dtype=np.int64),
        }
    if any(p.logit_bias for p in params):
        ids = _padded([[t for t, _ in p.logit_bias] for p in params])
        values = np.zeros(ids.shape, dtype=np.float32)  # (B, K)
        for b, p in enumerate(params):
            values[b, : len(p.logit_bias)] = [v for _, v in p.logit_bias]
        inputs |= {c.LOGIT_BIAS_IDS: ids, c.LOGIT_BIAS_VALUES: values}
    if eos:  # min_tokens: every EOS id is banned until then
        banned = [list(eos) if s.n_generated < s.params.min_tokens else [] for s in grp]
        if any(banned):
            inputs[c.BANNED_TOKEN_IDS] = _padded(banned)
    return inputs
