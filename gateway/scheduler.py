"""Continuous batching across the stage functions.

Each step: new sequences (up to max_prefill_batch) run their prefill as one batch, then every
running sequence advances one token in one batch: one call per stage (per replica holding rows).
Per sequence the scheduler keeps what it sent to every stage (token ids for the first, hidden
states for the others), so a stage that lost a sequence (409: evicted, restarted, another
replica) gets the missing inputs replayed and generation carries on unnoticed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.propagate import inject

from functions.tokenizer_core import IncrementalDecoder, TokenizerCore, TokenizerInputError
from gateway.clients import Clients, StageConflict, StageRejected
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, OverloadedError, StageError, StageUnavailableError
from gateway.metrics import GatewayMetrics
from gateway.replicas import Replica, Replicas

logger = logging.getLogger("tandem.gateway")
tracer = trace.get_tracer("tandem.gateway")
MAX_REPLAYS = 4  # per stage call: conflicts or failovers before the rows fail


@dataclass(frozen=True)
class StageLayout:
    """What the gateway learns from the stages' model metadata at start-up."""

    input_names: list[str]  # per stage: input_ids or hidden_states_{first layer}
    output_names: list[str]  # per stage: hidden_states_{next layer} or logits
    n_embd: int
    n_positions: int
    vocab_size: int
    model_id: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False


@dataclass
class Event:
    kind: str  # "token", "finish" or "error"
    token_id: int = -1
    text: str = ""
    logprob: float | None = None
    finish_reason: str | None = None
    error: GatewayError | None = None


class _Buffer:
    """Rows appended step by step (hidden states sent to one stage), amortised O(1)."""

    def __init__(self, width: int):
        self.data = np.empty((16, width), dtype=np.float32)
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
        return self.data[start:stop]


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    decoder: IncrementalDecoder
    n_stages: int
    width: int
    parent: trace.Span | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    held: list[int] = field(default_factory=list)  # per stage: positions we believe it caches
    replica: list[Replica | None] = field(default_factory=list)
    sent: list[_Buffer | None] = field(default_factory=list)  # per stage k >= 1: its inputs so far
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    text: str = ""  # generated text so far (before stop truncation)
    emitted: int = 0  # characters of `text` already sent to the client
    n_generated: int = 0
    finished: bool = False
    cancelled: bool = False
    seed: int = 0
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    stage_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.held = [0] * self.n_stages
        self.replica = [None] * self.n_stages
        self.sent = [None] + [_Buffer(self.width) for _ in range(self.n_stages - 1)]
        self.stage_seconds = [0.0] * self.n_stages
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(62)


class Scheduler:
    def __init__(
        self,
        cfg: GatewayConfig,
        clients: Clients,
        replicas: Replicas,
        metrics: GatewayMetrics,
        tokenizer: TokenizerCore,
        layout: StageLayout,
    ):
        self.cfg, self.clients, self.replicas, self.metrics = cfg, clients, replicas, metrics
        self.tokenizer, self.layout = tokenizer, layout
        self.n_embd, self.n_positions, self.eos = layout.n_embd, layout.n_positions, tokenizer.eos_token_id
        self._in_name, self._out_name = layout.input_names, layout.output_names
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self.steps = 0

    # ---- public API ----
    def submit(self, prompt: list[int], params: SamplingParams, parent: trace.Span | None = None) -> Sequence:
        if len(self.running) + len(self.waiting) >= self.cfg.max_running + self.cfg.max_waiting:
            raise OverloadedError(
                f"{len(self.running)} sequences running and {len(self.waiting)} waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        seq = Sequence(
            secrets.randbits(62),
            prompt,
            params,
            IncrementalDecoder(self.tokenizer, skip_special_tokens=True),
            self.cfg.stages,
            self.n_embd,
            parent,
        )
        self.waiting.append(seq)
        self.metrics.prompt_tokens.inc(len(prompt))
        self._gauges()
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.cancelled = True
            self._wake.set()

    async def stream(self, seq: Sequence) -> AsyncIterator[Event]:
        while True:
            ev = await seq.events.get()
            yield ev
            if ev.kind != "token":
                return

    async def run(self) -> None:
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop every other sequence for good
                logger.exception("scheduler step failed")
                for s in [*self.running]:
                    self._fail(s, GatewayError("internal error in the scheduler; see the gateway log"))
                await asyncio.sleep(0.1)

    # ---- the loop ----
    async def _iteration(self) -> None:
        if not self.running and not self.waiting:
            self._wake.clear()
            await self._wake.wait()
        self._drop_cancelled()
        room = min(self.cfg.max_prefill_batch, self.cfg.max_running - len(self.running))
        new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        self.running += new
        self._gauges()
        if new:
            await self._step(new, "prefill")
        old = [s for s in self.running if s not in new and not s.finished]
        if old:
            await self._step(old, "decode")
        self.running = [s for s in self.running if not s.finished]
        self._gauges()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            s.finished = True
            self.metrics.cancelled.inc()
        for s in [s for s in self.running if s.cancelled]:
            self.metrics.cancelled.inc()
            self._finish(s, None)
        self.running = [s for s in self.running if not s.finished]

    async def _step(self, rows: list[Sequence], phase: str) -> None:
        self.metrics.step_batch.labels(phase).observe(len(rows))
        n_new = {s.id: len(s.tokens) - s.held[0] for s in rows}
        last_step = {s.id: s.n_generated + 1 >= s.params.max_tokens for s in rows}
        x: dict[int, np.ndarray] = {}
        alive = list(rows)
        for k in range(self.cfg.stages):
            if not alive:
                return
            out = await self._call_stage(k, alive, x, n_new, last_step)
            alive = [s for s in alive if s.id in out]
            x = out
        for s in alive:
            token, logprob = x[s.id]
            self._accept(s, int(token), None if logprob is None else float(logprob), last_step[s.id])

    async def _call_stage(
        self,
        k: int,
        rows: list[Sequence],
        x: dict[int, np.ndarray],
        n_new: dict[int, int],
        last_step: dict[int, bool],
    ) -> dict[int, np.ndarray]:
        """Run rows through stage k (grouped by replica), replaying after 409s and failing over
        after replica failures. Returns per surviving row: the new positions' hidden states, or
        (token, logprob) for the last stage."""
        pool = self.replicas.pools[k]
        start = {s.id: s.held[k] for s in rows}  # past length to send; lowered by 409s
        pending = list(rows)
        results: dict[int, np.ndarray] = {}
        for _attempt in range(MAX_REPLAYS + 1):
            groups: dict[str, tuple[Replica, list[Sequence]]] = {}
            for s in pending:
                rep = s.replica[k]
                if rep is None or not rep.up:
                    new_rep = await self.replicas.wait_for(pool, s.id, self.cfg.stage_wait)
                    if new_rep is None:
                        self._fail(
                            s,
                            StageUnavailableError(
                                f"{pool.name} has no ready replica (waited {self.cfg.stage_wait:.0f} s): "
                                + self.replicas.readiness()[1]
                            ),
                        )
                        continue
                    if rep is not None and new_rep is not rep:
                        self.metrics.failovers.labels(pool.name).inc()
                    s.replica[k] = new_rep
                groups.setdefault(s.replica[k].node.id, (s.replica[k], []))[1].append(s)
            calls = [
                self._call_replica(k, rep, grp, x, start, n_new, last_step) for rep, grp in groups.values()
            ]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            pending = []
            for (rep, grp), outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, StageConflict):
                    for s in grp:
                        h = outcome.held.get(s.id)
                        if h is not None:
                            # what the stage holds, when it is a prefix of ours; else from scratch
                            start[s.id] = h if h < start[s.id] else 0
                            self.metrics.replays.labels(pool.name).inc()
                    pending += grp
                elif isinstance(outcome, StageRejected):
                    for s in grp:
                        self._fail(s, outcome)
                elif isinstance(outcome, StageError):
                    pool.mark(rep, False, str(outcome))  # its rows move (and count a failover)
                    pending += grp
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    results.update(outcome)
            if not pending:
                return results
        for s in pending:
            self._fail(s, StageError(f"{pool.name}: gave up after {MAX_REPLAYS} replays/failovers"))
        return results

    def _row_input(self, k: int, s: Sequence, x: dict[int, np.ndarray], start: int) -> np.ndarray:
        if k == 0:
            return np.asarray(s.tokens[start:], dtype=np.int64)  # (n,)
        sent = s.sent[k]
        if start == s.held[k]:
            return x[s.id]  # (n, C)
        return np.concatenate([sent.view(start, s.held[k]), x[s.id]])  # (held - start + n, C)

    async def _call_replica(
        self,
        k: int,
        rep: Replica,
        grp: list[Sequence],
        x: dict[int, np.ndarray],
        start: dict[int, int],
        n_new: dict[int, int],
        last_step: dict[int, bool],
    ):
        pool = self.replicas.pools[k]
        last = k == self.cfg.stages - 1
        rows = [self._row_input(k, s, x, start[s.id]) for s in grp]
        B, S = len(grp), max(len(r) for r in rows)
        mask = np.zeros((B, S), dtype=np.int64)  # (B, S) left padding
        if k == 0:
            xin = np.zeros((B, S), dtype=np.int64)  # (B, S)
        else:
            xin = np.zeros((B, S, self.n_embd), dtype=np.float32)  # (B, S, C)
        for b, r in enumerate(rows):
            xin[b, S - len(r) :] = r
            mask[b, S - len(r) :] = 1
        name = self._in_name[k]
        inputs = {
            "sequence_ids": np.array([s.id for s in grp], dtype=np.int64),
            "past_lengths": np.array([start[s.id] for s in grp], dtype=np.int64),
            name: xin,
            "attention_mask": mask,
            "sequence_end": np.array([last_step[s.id] for s in grp], dtype=np.bool_),
        }
        if last:
            p = [s.params for s in grp]
            inputs |= {
                "temperature": np.array([q.temperature for q in p], dtype=np.float32),
                "top_k": np.array([q.top_k for q in p], dtype=np.int64),
                "top_p": np.array([q.top_p for q in p], dtype=np.float32),
                "seed": np.array([s.seed for s in grp], dtype=np.int64),
            }
        if last:  # log-softmax over the vocabulary costs ~1 ms per row: only when someone wants it
            outputs = ["token_ids", "logprobs"] if any(s.params.logprobs for s in grp) else ["token_ids"]
        else:
            outputs = [self._out_name[k]]
        headers: dict[str, str] = {}
        t0 = time.perf_counter()
        # One span per request in the batch, each in its own request's trace (one trace per
        # request); the stage's server span hangs under the first, the others link to it.
        spans = [
            tracer.start_span(f"{pool.name} call", context=trace.set_span_in_context(s.parent))
            for s in grp
            if s.parent is not None and s.parent.is_recording()
        ]
        for span in spans:
            span.set_attribute("tandem.batch_size", B)
            span.set_attribute("tandem.replica", rep.node.id)
        if spans:
            inject(headers, context=trace.set_span_in_context(spans[0]))
        try:
            out = await self.clients.infer(rep.node, pool.name, inputs, outputs, headers)
        finally:
            for span in spans:
                span.end()
        dt = time.perf_counter() - t0
        self.metrics.stage_call.labels(pool.name, rep.node.id).observe(dt)
        result = {}
        for b, s in enumerate(grp):
            s.stage_seconds[k] += dt
            if k > 0:
                s.sent[k].truncate(s.held[k])  # replayed rows were already in the buffer
                s.sent[k].append(x[s.id])
            s.held[k] = start[s.id] + len(rows[b])
            if last:
                result[s.id] = (out["token_ids"][b], out["logprobs"][b] if "logprobs" in out else None)
            else:
                result[s.id] = out[self._out_name[k]][b, S - n_new[s.id] :]  # (n_new, C)
        return result

    # ---- per-token bookkeeping ----
    def _accept(self, s: Sequence, token: int, logprob: float | None, ended_in_stages: bool) -> None:
        now = time.perf_counter()
        if s.t_first is None:
            s.t_first = now
            self.metrics.ttft.observe(now - s.t_arrival)
        elif s.t_last is not None:
            self.metrics.itl.observe(now - s.t_last)
        s.t_last = now
        s.tokens.append(token)
        s.n_generated += 1
        self.metrics.generation_tokens.inc()
        if token == self.eos and not s.params.ignore_eos:
            s.text += s.decoder.flush()
            s.events.put_nowait(Event("token", token, self._drain_text(s, final=True), logprob))
            self._finish(s, "stop", ended_in_stages)
            return
        done = s.n_generated >= s.params.max_tokens or len(s.tokens) >= self.n_positions
        try:
            s.text += s.decoder.push(token)
        except TokenizerInputError:
            pass  # an id the tokenizer has no text for (a model vocabulary larger than the tokenizer's)
        if done:
            s.text += s.decoder.flush()  # bytes held back for an incomplete character
        hit = self._stop_hit(s)
        if hit is not None:
            s.text = s.text[:hit]
            s.events.put_nowait(Event("token", token, self._drain_text(s, final=True), logprob))
            self._finish(s, "stop", ended_in_stages)
            return
        s.events.put_nowait(Event("token", token, self._drain_text(s, final=done), logprob))
        if done:
            self._finish(s, "length", ended_in_stages)

    def _stop_hit(self, s: Sequence) -> int | None:
        hits = [
            i for i in (s.text.find(stop, max(0, s.emitted - len(stop))) for stop in s.params.stop) if i >= 0
        ]
        return min(hits) if hits else None

    def _drain_text(self, s: Sequence, final: bool) -> str:
        """Text not yet sent, holding back a tail that could still become a stop string."""
        if final:
            end = len(s.text)
        else:
            hold = 0
            for stop in s.params.stop:
                for n in range(min(len(stop) - 1, len(s.text)), 0, -1):
                    if s.text.endswith(stop[:n]):
                        hold = max(hold, n)
                        break
            end = len(s.text) - hold
        piece = s.text[s.emitted : end]
        s.emitted = max(s.emitted, end)
        return piece

    def _finish(self, s: Sequence, reason: str | None, ended_in_stages: bool = False) -> None:
        if s.finished:
            return
        s.finished = True
        if reason is not None:
            s.events.put_nowait(Event("finish", finish_reason=reason))
        if not ended_in_stages:
            self._release(s)

    def _fail(self, s: Sequence, err: GatewayError) -> None:
        if s.finished:
            return
        s.events.put_nowait(Event("error", error=err))
        self._finish(s, None)

    def _release(self, s: Sequence) -> None:
        """Free the sequence's KV cache in every stage that may hold it (in the background)."""
        for k, rep in enumerate(s.replica):
            if rep is not None and s.held[k] > 0:
                task = asyncio.create_task(
                    self.clients.release(rep.node, self.replicas.pools[k].name, [s.id])
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
