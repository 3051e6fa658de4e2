"""Chunked prefill (`prefill_chunk` C > 0): which prompt positions a lane's step runs, so that a
long prompt does not stall the running streams for its whole prefill.

A prompt whose rest (the positions stage 1 does not hold yet) fits in C runs whole, as without
chunking: short prompts and the choices of a fork (one position each) cost nothing. Longer ones
are prefilled chunk by chunk: each step, the sequences being chunked share a budget of C positions,
oldest first; one whose rest fits in what is left runs it (its last chunk, which chooses its first
token), the one at the edge of the budget runs a chunk up to it (its `chunk_end`), the rest wait
for a later step. The oldest always runs min(rest, C) positions, so every prefill progresses; then
the lane's decode step runs, so every running stream still gets one token per step.

A chunk is an ordinary stage call for positions [held, chunk_end): the pipeline sends those
(gateway.pipeline reads `Sequence.feed_end`), replays and fails over as for any call, and records
what each stage holds; the next chunk continues from there. A chunk before the prompt's last
chooses no token: the scheduler drops what the last stage sampled, without counting it (the
sampling stream is keyed by seed and position, functions/sampling.py, so nothing of it is used up),
and the call never carries sequence_end. Prompt scoring needs nothing more: each call scores the
positions it covers (gateway.scoring). With C = 0 every prompt is run whole in one step.
"""

from __future__ import annotations

from gateway.sequence import Sequence


def plan(pending: list[Sequence], chunk: int) -> list[Sequence]:
    """The rows of this step's prefill, from the lane's sequences in their prefill (oldest first);
    a row that runs only part of its prompt gets its `chunk_end` set (clear it with `done`)."""
    if chunk <= 0:
        return list(pending)
    rows: list[Sequence] = []
    budget = chunk
    for s in pending:
        rest = len(s.tokens) - s.held[0]  # positions stage 1 does not hold yet
        if rest <= chunk and not s.chunked:
            rows.append(s)  # it fits in a chunk: whole, as without chunking
        elif budget > 0:
            if rest > budget:
                s.chunk_end, s.chunked = s.held[0] + budget, True
            rows.append(s)
            budget -= rest
    return rows


def done(rows: list[Sequence]) -> None:
    """After the step (whatever became of it): the rows are whole sequences again."""
    for s in rows:
        s.chunk_end = None
