"""A small client-side driver for the stage functions: what the gateway's scheduler does, reduced to
the bare contract, so the stages can be tested without the gateway.

Per step it makes one binary Open Inference Protocol call per stage with every running row
(left-padded to the longest new input), carries the hidden states from stage to stage, and keeps
per sequence the inputs each stage has accepted. A 409 names the rows a stage lost and the lengths it
still holds; the driver replays the missing inputs of those rows to that stage, then resends the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from functions import contract as c
from functions import protocol
from functions import stage_api as api


class StageCallError(AssertionError):
    """A stage answered something other than 200 (or a 409 the driver could not repair)."""


@dataclass
class StageEndpoint:
    url: str  # base URL, e.g. http://127.0.0.1:PORT
    model: str  # "stage-1"
    input_name: str  # "input_ids" or "hidden_states_{first layer}"
    output_name: str  # "hidden_states_{next}" or "token_ids" (last stage)

    @property
    def first(self) -> bool:
        return self.input_name == c.INPUT_IDS

    @property
    def last(self) -> bool:
        return self.output_name == c.TOKEN_IDS


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    # sent[k]: the inputs stage k has accepted, one per position (a token id for the first stage,
    # a (C,) float32 vector for the others); len(sent[k]) is the past length stage k holds.
    sent: list[list[Any]] = field(default_factory=list)

    def next_inputs(self) -> list[int]:
        return list(self.prompt) if not self.generated else [self.generated[-1]]


def left_pad(rows: list[list[Any]], first: bool, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids (first stage) or of (C,) hidden states, left-padded by the contract's rule."""
    if first:
        return c.left_pad([np.asarray(r, dtype=np.int64) for r in rows])
    width = width or len(next(r for r in rows if r)[0])
    arrays = [np.stack(r).astype(np.float32) if r else np.zeros((0, width), np.float32) for r in rows]
    return c.left_pad(arrays, width)


class StageDriver:
    def __init__(self, stages: list[StageEndpoint], client: httpx.Client):
        self.stages = stages
        self.client = client
        self.conflicts: list[tuple[str, dict[str, Any]]] = []  # (model, 409 problem body)
        self.replayed_positions = 0

    # ---- one call ----
    def call(
        self, stage: StageEndpoint, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> httpx.Response:
        body, hlen = protocol.encode_request(inputs, outputs=outputs or [stage.output_name])
        return self.client.post(
            stage.url + api.infer_path(stage.model),
            content=body,
            headers={protocol.HEADER: str(hlen), "Content-Type": "application/octet-stream"},
        )

    @staticmethod
    def decode(response: httpx.Response) -> dict[str, np.ndarray]:
        raw = response.headers.get(protocol.HEADER)
        return protocol.decode_response(response.content, int(raw) if raw is not None else None).outputs

    def _batch(
        self, k: int, seqs: list[Sequence], rows: list[list[Any]], end: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        stage = self.stages[k]
        x, mask = left_pad(rows, stage.first)
        inputs = {
            c.SEQUENCE_IDS: np.array([s.seq_id for s in seqs], dtype=np.int64),
            c.PAST_LENGTHS: np.array([len(s.sent[k]) for s in seqs], dtype=np.int64),
            stage.input_name: x,
            c.ATTENTION_MASK: mask,
        }
        if end is not None:
            inputs[c.SEQUENCE_END] = end
        return inputs

    # ---- one step of every sequence through every stage ----
    def step(self, seqs: list[Sequence], end: bool = False) -> list[int]:
        for s in seqs:
            while len(s.sent) < len(self.stages):
                s.sent.append([])
        rows: list[list[Any]] = [s.next_inputs() for s in seqs]
        end_arr = np.full(len(seqs), end, dtype=bool) if end else None
        for k, stage in enumerate(self.stages):
            inputs = self._batch(k, seqs, rows, end_arr)
            response = self.call(stage, inputs)
            if response.status_code == 409:
                problem = response.json()
                self.conflicts.append((stage.model, problem))
                self._replay_rows(k, seqs, problem)
                inputs = self._batch(k, seqs, rows, end_arr)
                response = self.call(stage, inputs)
            if response.status_code != 200:
                raise StageCallError(f"{stage.model} answered {response.status_code}: {response.text}")
            out = self.decode(response)[stage.output_name]
            for s, r in zip(seqs, rows, strict=True):
                s.sent[k].extend(r)
            if stage.last:
                tokens = [int(t) for t in out]
                for s, t in zip(seqs, tokens, strict=True):
                    s.generated.append(t)
                return tokens
            S = out.shape[1]
            rows = [[out[b, p].copy() for p in range(S - len(r), S)] for b, r in enumerate(rows)]
        raise AssertionError("no last stage")

    def _replay_rows(self, k: int, seqs: list[Sequence], problem: dict[str, Any]) -> None:
        by_id = {s.seq_id: s for s in seqs}
        ids, held = problem[c.SEQUENCE_IDS], problem[c.HELD_LENGTHS]
        assert problem[c.PAST_LENGTHS] == [len(by_id[i].sent[k]) for i in ids], problem
        lost = [by_id[i] for i in ids]
        replay = [s.sent[k][h:] for s, h in zip(lost, held, strict=True)]
        stage = self.stages[k]
        x, mask = left_pad(replay, stage.first)
        inputs = {
            c.SEQUENCE_IDS: np.array(ids, dtype=np.int64),
            c.PAST_LENGTHS: np.array(held, dtype=np.int64),
            stage.input_name: x,
            c.ATTENTION_MASK: mask,
        }
        response = self.call(stage, inputs)
        if response.status_code != 200:
            raise StageCallError(f"replay to {stage.model} answered {response.status_code}: {response.text}")
        self.replayed_positions += sum(len(r) for r in replay)

    def generate(self, seqs: list[Sequence], n: int, after_step: Any = None) -> list[list[int]]:
        """n greedy steps; `after_step(i)` runs after step i (0-based), e.g. to disturb a stage."""
        for i in range(n):
            self.step(seqs)
            if after_step is not None:
                after_step(i)
        return [s.generated for s in seqs]
