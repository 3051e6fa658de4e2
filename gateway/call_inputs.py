"""What one stage call carries: each row's new inputs (token ids for the first stage, hidden states
for the others, with the part a replay resends), the rows grouped into calls within the stages'
bounds, the wire tensors and the outputs to ask for (gateway.pipeline sends them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from functions import contract as c
from gateway import scoring
from gateway.processor_inputs import processor_inputs
from gateway.sequence import Sequence

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class StageLayout:
    """What the gateway learns from the stages' model metadata at start-up."""

    input_names: list[str]  # per stage: input_ids or hidden_states_{first layer}
    output_names: list[str]  # per stage: hidden_states_{next layer} or token_ids
    hidden_size: int  # the hidden states' width between stages
    max_positions: int  # the context window
    vocab_size: int
    model_id: str
    max_batch_tokens: int = 1 << 62  # rows x new positions a stage takes per call (the smallest)
    max_call_positions: int = 1 << 62  # rows x (past + new) positions per call: the KV budget
    scoring: bool = False  # the last stage scores prompt positions (its bundle has the scoring head)

    @property
    def stages(self) -> int:
        return len(self.input_names)


def row_length(k: int, s: Sequence, x: dict[int, np.ndarray], start: int) -> int:
    """New positions row `s` sends stage k when the stage holds `start` of them."""
    if k == 0:
        return s.feed_end - start
    return s.held[k] - start + len(x[s.id])


def row_input(k: int, s: Sequence, x: dict[int, np.ndarray], start: int) -> np.ndarray:
    """Row `s`'s new inputs for stage k from position `start`: (n,) token ids or (n, C) states."""
    if k == 0:
        return np.asarray(s.tokens[start : s.feed_end], dtype=np.int64)  # (n,)
    sent = s.sent[k]
    assert sent is not None
    if start == s.held[k]:
        return x[s.id]  # (n, C)
    return np.concatenate([sent.view(start, s.held[k]), x[s.id]])  # (held - start + n, C)


def split_rows(
    layout: StageLayout, k: int, grp: list[Sequence], x: dict[int, np.ndarray], start: dict[int, int]
) -> list[list[Sequence]]:
    """The rows for one replica as calls within the stages' bounds (rows x new positions, and
    rows x (past + new) positions for the KV budget): as they are when they fit (decode steps
    keep their order, which lets a stage reuse its last batch), else longest first, each call as
    full as the bounds allow."""
    new = {s.id: row_length(k, s, x, start[s.id]) for s in grp}

    def fits(part: list[Sequence]) -> bool:
        width = max(new[s.id] for s in part)
        past = max(start[s.id] for s in part)
        return (
            len(part) * width <= layout.max_batch_tokens
            and len(part) * (past + width) <= layout.max_call_positions
        )

    if fits(grp):
        return [grp]
    parts: list[list[Sequence]] = [[]]
    for s in sorted(grp, key=lambda s: (-new[s.id], -start[s.id])):
        if parts[-1] and not fits([*parts[-1], s]):
            parts.append([])
        parts[-1].append(s)
    return parts


def stage_inputs(
    layout: StageLayout,
    k: int,
    grp: list[Sequence],
    rows: list[np.ndarray],
    start: dict[int, int],
    eos: tuple[int, ...],
) -> Inputs:
    """The wire tensors of one call to stage k (the last stage's sampling inputs included)."""
    xin, mask = c.left_pad(rows, None if k == 0 else layout.hidden_size)
    inputs = {
        c.SEQUENCE_IDS: np.array([s.id for s in grp], dtype=np.int64),
        c.PAST_LENGTHS: np.array([start[s.id] for s in grp], dtype=np.int64),
        layout.input_names[k]: xin,
        c.ATTENTION_MASK: mask,
        c.SEQUENCE_END: np.array([s.last_step for s in grp], dtype=np.bool_),
        # from scratch (a new sequence, or a replay a stage could not continue): say so
        c.SEQUENCE_START: np.array([start[s.id] == 0 for s in grp], dtype=np.bool_),
    }
    if k == layout.stages - 1:
        p = [s.params for s in grp]
        inputs |= {
            c.TEMPERATURE: np.array([q.temperature for q in p], dtype=np.float32),
            c.TOP_K: np.array([q.top_k for q in p], dtype=np.int64),
            c.TOP_P: np.array([q.top_p for q in p], dtype=np.float32),
            c.SEED: np.array([s.seed for s in grp], dtype=np.int64),
        }
        if any(q.processed for q in p):  # penalties, logit_bias, min_tokens: only then
            inputs |= processor_inputs(grp, eos)
    return inputs


def stage_outputs(
    layout: StageLayout,
    k: int,
    grp: list[Sequence],
    rows: list[np.ndarray],
    start: dict[int, int],
    inputs: Inputs,
) -> tuple[list[str], tuple[np.ndarray, scoring.Asked] | None]:
    """The outputs to ask stage k for (adding the scoring inputs they need to `inputs`), and the
    prompt positions this call scores, if any."""
    if k != layout.stages - 1:
        return [layout.output_names[k]], None
    # log-softmax over the vocabulary costs ~1 ms per row: only when someone wants it
    outputs = [c.TOKEN_IDS, c.LOGPROBS] if any(s.params.logprobs for s in grp) else [c.TOKEN_IDS]
    if scoring.wants_top(grp):  # per row: the rows that ask (functions/scoring.py)
        inputs[c.NUM_TOP] = np.array([s.params.top_logprobs for s in grp], dtype=np.int64)
        outputs += [c.TOP_IDS, c.TOP_LOGPROBS]
    scored = scoring.targets(grp, rows, start)
    if scored is not None:
        inputs[c.TARGET_IDS] = scored[0]
        outputs += [c.TARGET_LOGPROBS, c.TARGET_TOP_IDS, c.TARGET_TOP_LOGPROBS]
    return outputs, scored
