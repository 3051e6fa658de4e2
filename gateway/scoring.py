"""Log-probabilities beyond the sampled token's: what the last stage is asked for, per row that
wants it (functions/scoring.py serves it), and the OpenAI legacy `logprobs` object built from them.

Prompt scoring (`echo` with `logprobs`): the prompt token at position i (i >= 1) is scored from the
final hidden state at position i - 1. A row's call covers positions [past, past + n); each position
whose next prompt token has no score yet gets it as its target. Scores are kept by position, so a
prefill that is replayed (409), moved to another replica or split over calls asks for every
position exactly once: only what is still missing is asked, and only a call that succeeded records.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from functions import contract as c
from gateway.sequence import Sequence, Top


def wants_top(grp: Seq[Sequence]) -> bool:
    return any(s.params.top_logprobs > 0 for s in grp)


Asked = list[tuple[int, int]]  # (row, prompt position), in the row-major order the stage answers


def targets(
    grp: Seq[Sequence], rows: Seq[np.ndarray], start: dict[int, int]
) -> tuple[np.ndarray, Asked] | None:
    """The (B, S) target_ids beside the left-padded new positions (-1: not scored) and what each
    target scores, or None when no row of the batch scores a position."""
    S = max(len(r) for r in rows)
    out: np.ndarray | None = None
    asked: Asked = []
    for b, s in enumerate(grp):
        if not s.params.score_prompt:
            continue
        p0, n, L = start[s.id], len(rows[b]), len(s.prompt)
        for j in range(n):
            nxt = p0 + j + 1  # the prompt position this one predicts
            if nxt < L and nxt not in s.prompt_scores:
                if out is None:
                    out = np.full((len(grp), S), -1, dtype=np.int64)
                out[b, S - n + j] = s.prompt[nxt]
                asked.append((b, nxt))
    return None if out is None else (out, asked)


def record(grp: Seq[Sequence], asked: Asked, out: dict[str, np.ndarray]) -> None:
    """Keep the scores a successful call returned, by prompt position."""
    lps, top_ids, top_lps = out[c.TARGET_LOGPROBS], out[c.TARGET_TOP_IDS], out[c.TARGET_TOP_LOGPROBS]
    for i, (b, position) in enumerate(asked):
        s = grp[b]
        k = s.params.top_logprobs
        top = tuple((int(t), float(v)) for t, v in zip(top_ids[i, :k], top_lps[i, :k], strict=True))
        s.prompt_scores[position] = (float(lps[i]), top)


def row_top(out: dict[str, np.ndarray], b: int, k: int) -> Top | None:
    """The top-k at row b's sampled position, when asked."""
    if k <= 0 or c.TOP_IDS not in out:
        return None
    return tuple(
        (int(t), float(v)) for t, v in zip(out[c.TOP_IDS][b, :k], out[c.TOP_LOGPROBS][b, :k], strict=True)
    )


def logprobs_object(
    text_of: Callable[[int], str],
    token_ids: Seq[int],
    logprobs: Seq[float | None],
    tops: Seq[Top | None] | None,
    offset: int = 0,
) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs (None when no
    alternatives were asked, else a {text: logprob} per token, None where there is none),
    text_offset (each token's first character in the text, from `offset`)."""
    texts = [text_of(t) for t in token_ids]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    top_dicts = None
    if tops is not None:
        top_dicts = [None if top is None else {text_of(t): v for t, v in top} for top in tops]
    return {
        "tokens": texts,
        "token_logprobs": list(logprobs),
        "top_logprobs": top_dicts,
        "text_offset": offsets,
    }


def choice_logprobs(
    text_of: Callable[[int], str],
    seq: Sequence,
    token_ids: Seq[int],
    logprobs: Seq[float | None],
    tops: Seq[Top | None],
    echo: bool,
) -> dict[str, Any]:
    """A whole choice's `logprobs`: with echo, the prompt tokens first (the very first has neither
    a logprob nor alternatives), then the generated ones."""
    ids, lps, top = list(token_ids), list(logprobs), list(tops)
    if echo:
        scores = [seq.prompt_scores.get(p) for p in range(1, len(seq.prompt))]
        ids = [*seq.prompt, *ids]
        lps = [None, *(None if s is None else s[0] for s in scores), *lps]
        top = [None, *(None if s is None else s[1] for s in scores), *top]
    return logprobs_object(text_of, ids, lps, top if seq.params.top_logprobs > 0 else None)
