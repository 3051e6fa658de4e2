"""One generation request's state in the gateway: its sampling parameters, the tokens so far, what
every stage has been sent (for replay), the text released to the client, and the stop-string
hold-back; and a whole generation's outcome, gathered from its events. No I/O here: the scheduler
drives it, the routes read its events.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from opentelemetry import trace

from functions.tokenizer_core import IncrementalDecoder, TokenizerInputError
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.replicas import Replica


Top = tuple[tuple[int, float], ...]  # (token id, logprob), best first
Score = tuple[float, Top]  # a prompt token's logprob and the top-N at its position


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # the last stage returns the chosen tokens' logprobs
    top_logprobs: int = 0  # alternatives per token (OpenAI's logprobs: N), 0 = none
    score_prompt: bool = False  # echo with logprobs: the prompt tokens' log-probabilities too
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM extension, over prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    min_tokens: int = 0  # vLLM extension: EOS banned (and stop strings not checked) until this many

    @property
    def processed(self) -> bool:
        """The last stage needs the logits processors' inputs for this row (functions.processors)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


@dataclass
class Event:
    kind: str  # "token", "finish" or "error"
    token_id: int = -1
    text: str = ""
    logprob: float | None = None
    finish_reason: str | None = None
    top: Top | None = None  # the top-N alternatives, when asked
    error: GatewayError | None = None


@dataclass
class Outcome:
    """A whole (non-streamed) generation."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    tops: list[Top | None] = field(default_factory=list)  # per token: its alternatives, when asked
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seconds: float = 0.0
    ttft: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def apply(self, ev: Event) -> None:
        """Take one event of the sequence (an error event is raised)."""
        if ev.kind == "error":
            assert ev.error is not None
            raise ev.error
        if ev.kind == "token":
            self.token_ids.append(ev.token_id)
            self.text += ev.text
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
            self.tops.append(ev.top)
        else:
            self.finish_reason = ev.finish_reason


class StageInputs:
    """The hidden states one stage has been sent for a sequence, one row per position, appended
    step by step (amortised O(1)); a replay reads a slice of it."""

    def __init__(self, width: int):
        self.data = np.empty((16, width), dtype=np.float32)  # (capacity, C)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self.data.shape[0]:
            grown = np.empty((max(need, 2 * self.data.shape[0]), self.data.shape[1]), dtype=np.float32)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : need] = rows
        self.n = need

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def view(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]  # (stop - start, C)


@dataclass
class Sequence:
    id: int  # random 62 bits: unguessable, and the stages' key for its KV cache
    prompt: list[int]
    params: SamplingParams
    decoder: IncrementalDecoder
    n_stages: int
    width: int  # hidden_size: the hidden state size sent to stages 2..N
    parent: trace.Span | None = None  # the request's span: stage-call spans hang under it
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    held: list[int] = field(default_factory=list)  # per stage: positions we believe it caches
    replica: list[Replica | None] = field(default_factory=list)
    # (stage, replica) pairs the sequence moved away from: they may still hold part of its KV cache
    # (a replica that was only unreachable for a while), so they are asked to free it at the end too
    left: list[tuple[int, Replica]] = field(default_factory=list)
    sent: list[StageInputs | None] = field(default_factory=list)  # per stage k >= 1: its inputs so far
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    text: str = ""  # generated text so far (before stop truncation)
    emitted: int = 0  # characters of `text` already sent to the client
    n_generated: int = 0
    finished: bool = False
    cancelled: bool = False
    seed: int = 0
    _top: Top | None = None  # the alternatives of the token being accepted
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    stage_seconds: list[float] = field(default_factory=list)
    # a fork parent: prefills prompt[:-1] once for these children, then each continues from it
    children: list[Sequence] = field(default_factory=list)
    prompt_scores: dict[int, Score] = field(default_factory=dict)  # prompt position -> its score
    # during a prefill chunk that is not the prompt's last (gateway.prefill): the stages are sent
    # positions up to here only, and the token the last stage chooses is not this sequence's
    chunk_end: int | None = None
    chunked: bool = False  # part of its prompt went through as a chunk: the rest goes by the budget

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.held = [0] * self.n_stages
        self.replica = [None] * self.n_stages
        self.sent = [None] + [StageInputs(self.width) for _ in range(self.n_stages - 1)]
        self.stage_seconds = [0.0] * self.n_stages
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(62)

    def adopt(self, parent: Sequence) -> None:
        """Continue from what a fork parent has sent every stage (its prompt is ours minus the last
        token): the same replicas and lengths, and a copy of its inputs, for a replay."""
        self.held = list(parent.held)
        self.replica = list(parent.replica)
        for k in range(1, self.n_stages):
            src, dst = parent.sent[k], self.sent[k]
            assert src is not None and dst is not None
            dst.append(src.view(0, src.n))

    @classmethod
    def new(
        cls,
        prompt: list[int],
        params: SamplingParams,
        decoder: IncrementalDecoder,
        n_stages: int,
        width: int,
        parent: trace.Span | None = None,
    ) -> Sequence:
        return cls(secrets.randbits(62), prompt, params, decoder, n_stages, width, parent)

    @property
    def feed_end(self) -> int:
        """The positions the stages are to hold after this step: every token, or the chunk's end."""
        return len(self.tokens) if self.chunk_end is None else self.chunk_end

    @property
    def last_step(self) -> bool:
        """The next token is this sequence's last under max_tokens (the stages may free it then);
        never during a prefill chunk before the prompt's last, which chooses no token."""
        return self.chunk_end is None and self.n_generated + 1 >= self.params.max_tokens

    def accept(
        self,
        token: int,
        logprob: float | None,
        eos: frozenset[int],
        max_positions: int,
        top: Top | None = None,
    ) -> str | None:
        """Take one generated token: queue its event (text held back while it may still become a
        stop string) and return the finish reason when this token ends the sequence."""
        self._top = top
        self.tokens.append(token)
        self.n_generated += 1
        early = self.n_generated < self.params.min_tokens  # no stop yet (EOS is banned in the stage)
        if token in eos and not self.params.ignore_eos and not early:
            self.text += self.decoder.flush()
            self._emit(token, logprob, final=True)
            return "stop"
        done = self.n_generated >= self.params.max_tokens or len(self.tokens) >= max_positions
        try:
            self.text += self.decoder.push(token)
        except TokenizerInputError:
            pass  # an id the tokenizer has no text for (a model vocabulary larger than the tokenizer's)
        if done:
            self.text += self.decoder.flush()  # bytes held back for an incomplete character
        hit = None if early else self._stop_hit()
        if hit is not None:
            self.text = self.text[:hit]
            self._emit(token, logprob, final=True)
            return "stop"
        self._emit(token, logprob, final=done)
        return "length" if done else None

    def finish(self, reason: str | None) -> bool:
        """Mark finished (queueing the finish event when there is a reason); False if it already was."""
        if self.finished:
            return False
        self.finished = True
        if reason is not None:
            self.events.put_nowait(Event("finish", finish_reason=reason))
        return True

    def fail(self, err: GatewayError) -> bool:
        for child in self.children:  # a fork parent's failure is its children's
            child.fail(err)
        if self.finished:
            return False
        self.events.put_nowait(Event("error", error=err))
        return self.finish(None)

    def _emit(self, token: int, logprob: float | None, final: bool) -> None:
        self.events.put_nowait(Event("token", token, self._drain_text(final), logprob, top=self._top))

    def _stop_hit(self) -> int | None:
        """Where the earliest stop string starts in the text, searching only what it could newly match."""
        found = (self.text.find(stop, max(0, self.emitted - len(stop))) for stop in self.params.stop)
        hits = [i for i in found if i >= 0]
        return min(hits) if hits else None

    def _drain_text(self, final: bool) -> str:
        """Text not yet sent, holding back a tail that could still become a stop string."""
        if final:
            end = len(self.text)
        else:
            hold = 0
            for stop in self.params.stop:
                for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:n]):
                        hold = max(hold, n)
                        break
            end = len(self.text) - hold
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece
