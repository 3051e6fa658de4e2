"""Continuous batching: the loop that admits sequences and advances them across the stages.

Each step: new sequences (up to max_prefill_batch) run their prefill as one batch, then every
running sequence advances one token in one batch, one call per stage (gateway.pipeline, which
replays and fails over). Finished, failed and cancelled sequences leave, and their KV cache is
freed in every stage that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from functions.tokenizer_core import IncrementalDecoder, TokenizerCore
from gateway.clients import Clients
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, OverloadedError, StageTimeoutError
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.replicas import Replicas
from gateway.scoring import Top
from gateway.sequence import Event, SamplingParams, Sequence

logger = logging.getLogger("tandem.gateway")


class Scheduler:
    def __init__(
        self,
        cfg: GatewayConfig,
        clients: Clients,
        replicas: Replicas,
        metrics: GatewayMetrics,
        tokenizer: TokenizerCore,
        pipeline: Pipeline,
    ):
        self.cfg, self.clients, self.replicas, self.metrics = cfg, clients, replicas, metrics
        self.tokenizer, self.pipeline = tokenizer, pipeline
        self.n_positions, self.eos = pipeline.layout.n_positions, tokenizer.eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.steps = 0

    # ---- public API ----
    @property
    def free_slots(self) -> int:
        return self.cfg.max_running + self.cfg.max_waiting - len(self.running) - len(self.waiting)

    def submit_all(
        self, prompts: list[list[int]], params: SamplingParams, parent: object = None
    ) -> list[Sequence]:
        """Queue every prompt of one request, or none: a request is admitted whole or refused whole."""
        if len(prompts) > self.free_slots:
            raise OverloadedError(
                f"{len(self.running)} sequences running and {len(self.waiting)} waiting; this request "
                f"needs {len(prompts)} slot(s) of {self.free_slots} free; retry shortly",
                headers={"Retry-After": "1"},
            )
        seqs = [
            Sequence.new(
                prompt,
                params,
                IncrementalDecoder(self.tokenizer, skip_special_tokens=True),
                self.cfg.stages,
                self.pipeline.layout.n_embd,
                parent,  # type: ignore[arg-type]
            )
            for prompt in prompts
        ]
        self.waiting.extend(seqs)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        self._gauges()
        self._wake.set()
        return seqs

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
        """Drop what was cancelled, and fail (504) what ran past the request deadline."""
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            s.finish(None)
            self.metrics.cancelled.inc()
        for s in [s for s in self.running if s.cancelled]:
            self.metrics.cancelled.inc()
            self._finish(s, None)
        limit = self.cfg.request_timeout
        late = time.perf_counter() - limit
        for s in [s for s in self.waiting if s.t_arrival < late]:
            self.waiting.remove(s)
            s.fail(StageTimeoutError(f"the request ran longer than request_timeout ({limit:g} s)"))
        for s in [s for s in self.running if s.t_arrival < late]:
            self._fail(s, StageTimeoutError(f"the request ran longer than request_timeout ({limit:g} s)"))
        self.running = [s for s in self.running if not s.finished]

    async def _step(self, rows: list[Sequence], phase: str) -> None:
        self.metrics.step_batch.labels(phase).observe(len(rows))
        ended_in_stages = {s.id: s.last_step for s in rows}  # sent with sequence_end: freed there
        x: dict[int, np.ndarray] = {}
        alive = list(rows)
        for k in range(self.cfg.stages):
            if not alive:
                return
            out = await self.pipeline.run(k, alive, x)
            for s, err in out.failed:
                self._fail(s, err)
            alive = [s for s in alive if s.id in out.results]
            x = out.results  # type: ignore[assignment]  # hidden states for the next stage
        for s in alive:
            token, logprob, top = out.results[s.id]
            self._accept(s, int(token), logprob, ended_in_stages[s.id], top)

    def _accept(
        self, s: Sequence, token: int, logprob: float | None, ended_in_stages: bool, top: Top | None = None
    ) -> None:
        if s.params.max_tokens == 0:  # echo only (prompt scoring): the sampled token is not wanted
            self._finish(s, "length", ended_in_stages)
            return
        now = time.perf_counter()
        if s.t_first is None:
            s.t_first = now
            self.metrics.ttft.observe(now - s.t_arrival)
        elif s.t_last is not None:
            self.metrics.itl.observe(now - s.t_last)
        s.t_last = now
        self.metrics.generation_tokens.inc()
        reason = s.accept(token, logprob, self.eos, self.n_positions, top)
        if reason is not None:
            self._finish(s, reason, ended_in_stages)

    def _finish(self, s: Sequence, reason: str | None, ended_in_stages: bool = False) -> None:
        if s.finish(reason):
            self._release(s, ended_in_stages)

    def _fail(self, s: Sequence, err: GatewayError) -> None:
        if s.fail(err):
            self._release(s)

    def _release(self, s: Sequence, ended_in_stages: bool = False) -> None:
        """Free the sequence's KV cache in every stage that may hold it (in the background); when its
        last call carried sequence_end, only the replicas it moved away from are left to ask."""
        current = [(k, rep) for k, rep in enumerate(s.replica) if rep is not None and s.held[k] > 0]
        left = [(k, rep) for k, rep in s.left if rep is not s.replica[k]]
        for k, rep in left if ended_in_stages else current + left:
            task = asyncio.create_task(self.clients.release(rep.node, self.replicas.pools[k].name, [s.id]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
