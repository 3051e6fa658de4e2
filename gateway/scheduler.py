"""Continuous batching: the loop that admits sequences and advances them across the stages.

Each step: new sequences (up to max_prefill_batch) run their prefill as one batch, then every
running sequence advances one token in one batch, one call per stage (gateway.pipeline, which
replays and fails over). Finished, failed and cancelled sequences leave, and their KV cache is
freed in every stage that holds it. With `prefill_chunk` C > 0 a prompt longer than C is prefilled
C positions per step, so that it does not stall the running sequences (gateway.prefill).

Pipelined micro-batches (`pipeline_depth` D > 1): the running sequences are spread over D lanes,
each an independent step loop over its own sequences. While one lane's batch is in stage 2, another
lane's can be in stage 1 and a third in stage 3, so the stages (separate processes, separate
machines) work at the same time instead of two of three waiting; a hop's latency is hidden behind
the other lanes' work. A sequence stays in its lane, so its tokens, its KV positions, replay,
failover and cancellation are exactly as with one lane (D = 1, the plain loop). New sequences go to
the lane with the fewest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from functions.tokenizer_core import IncrementalDecoder, TokenizerCore
from gateway import prefill
from gateway.clients import Clients
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, OverloadedError, StageTimeoutError
from gateway.forks import PARENT, Forks, choice_seed
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.replicas import Replica, Replicas
from gateway.sequence import Event, SamplingParams, Sequence, Top

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
        self.max_positions, self.eos = pipeline.layout.max_positions, frozenset(tokenizer.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.lanes: list[list[Sequence]] = [[] for _ in range(cfg.pipeline_depth)]
        self._wake = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.steps = 0
        self.forks = Forks(clients, replicas, metrics, self._release_one)

    # ---- public API ----
    @property
    def running(self) -> list[Sequence]:
        return [s for lane in self.lanes for s in lane]

    @property
    def free_slots(self) -> int:
        # a fork parent stands in for its children until it forks
        reserved = sum(
            len(s.children) - 1 for s in (*self.running, *self.waiting) if s.children and not s.finished
        )
        used = len(self.running) + len(self.waiting) + reserved
        return self.cfg.max_running + self.cfg.max_waiting - used

    def submit_all(
        self, prompts: list[list[int]], params: SamplingParams, parent: object = None, n: int = 1
    ) -> list[Sequence]:
        """Queue every prompt of one request, `n` choices each, or none: a request is admitted whole
        or refused whole. The choices of a prompt share one prefill (a fork parent, gateway.forks).
        Returns the choices, prompt by prompt."""
        need = len(prompts) * n
        if need > self.free_slots:
            raise OverloadedError(
                f"{len(self.running)} sequences running and {len(self.waiting)} waiting; this request "
                f"needs {need} slot(s) of {self.free_slots} free; retry shortly",
                headers={"Retry-After": "1"},
            )
        choices: list[Sequence] = []
        for prompt in prompts:
            seqs = [self._new(prompt, params, parent, choice_seed(params.seed, j)) for j in range(n)]
            choices += seqs
            if n > 1 and len(prompt) > 1:
                self.waiting.append(self.forks.parent_of(seqs, self._new(prompt[:-1], PARENT, parent, 0)))
            else:
                self.waiting.extend(seqs)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        self._gauges()
        self._wake.set()
        return choices

    def _new(self, prompt: list[int], params: SamplingParams, parent: object, seed: int | None) -> Sequence:
        seq = Sequence.new(
            prompt,
            params,
            IncrementalDecoder(self.tokenizer, skip_special_tokens=True),
            self.cfg.stages,
            self.pipeline.layout.hidden_size,
            parent,  # type: ignore[arg-type]
        )
        if seed is not None:
            seq.seed = seed
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
        await asyncio.gather(*(self._lane(i) for i in range(len(self.lanes))))

    async def _lane(self, i: int) -> None:
        while True:
            try:
                await self._iteration(i)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop every other sequence for good
                logger.exception("scheduler step failed")
                for s in [*self.lanes[i]]:
                    self._fail(s, GatewayError("internal error in the scheduler; see the gateway log"))
                await asyncio.sleep(0.1)

    # ---- the loop (one per lane) ----
    async def _iteration(self, i: int) -> None:
        lane = self.lanes[i]
        if not lane and not self._room(i):
            self._wake.clear()  # woken by a submission, a cancellation or a sequence leaving
            await self._wake.wait()
        self._drop_cancelled(lane)
        lane += [self.waiting.popleft() for _ in range(self._room(i))]
        self._gauges()
        old = [s for s in lane if s.n_generated > 0]  # the rest are in their prefill
        rows = prefill.plan([s for s in lane if s.n_generated == 0], self.cfg.prefill_chunk)
        if rows:
            try:
                parents = await self._step(rows, "prefill")
            finally:
                prefill.done(rows)
            if parents:  # their children are in `waiting` now, first in line (for any lane)
                await self.forks.fork(parents, self.waiting)
        old = [s for s in old if not s.finished]
        if old:
            await self._step(old, "decode")
        self._leave(lane)
        self._gauges()
        self.steps += 1

    def _leave(self, lane: list[Sequence]) -> None:
        """Finished sequences leave the lane; their slots may let another lane take waiting work."""
        kept = [s for s in lane if not s.finished]
        if len(kept) < len(lane) and len(self.lanes) > 1:
            self._wake.set()
        lane[:] = kept

    def _room(self, i: int) -> int:
        """How many waiting sequences lane i takes now: within max_running and max_prefill_batch,
        and no more than its share, so that the lanes stay even."""
        running = sum(len(lane) for lane in self.lanes)
        room = min(self.cfg.max_prefill_batch, self.cfg.max_running - running, len(self.waiting))
        share = -(-(running + len(self.waiting)) // len(self.lanes))  # ceiling
        return max(0, min(room, share - len(self.lanes[i])))

    def _drop_cancelled(self, lane: list[Sequence]) -> None:
        """Drop what was cancelled, and fail (504) what ran past the request deadline: in the queue
        and in this lane (another lane's sequences may be in a stage call right now)."""
        for s in [*self.waiting, *lane]:
            if s.children and all(c.cancelled for c in s.children):
                s.cancelled = True  # a fork parent nobody waits for any more
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            s.finish(None)
            self.metrics.cancelled.inc()
        for s in [s for s in lane if s.cancelled]:
            self.metrics.cancelled.inc()
            self._finish(s, None)
        limit = self.cfg.request_timeout
        late = time.perf_counter() - limit
        for s in [s for s in self.waiting if s.t_arrival < late]:
            self.waiting.remove(s)
            s.fail(StageTimeoutError(f"the request ran longer than request_timeout ({limit:g} s)"))
        for s in [s for s in lane if s.t_arrival < late]:
            self._fail(s, StageTimeoutError(f"the request ran longer than request_timeout ({limit:g} s)"))
        self._leave(lane)

    async def _step(self, rows: list[Sequence], phase: str) -> list[Sequence]:
        """One call per stage for `rows`; returns the fork parents that went through (they choose
        no token: their children continue from them)."""
        self.metrics.step_batch.labels(phase).observe(len(rows))
        ended_in_stages = {s.id: s.last_step for s in rows}  # sent with sequence_end: freed there
        x: dict[int, np.ndarray] = {}
        alive = list(rows)
        for k in range(self.cfg.stages):
            if not alive:
                return []
            out = await self.pipeline.run(k, alive, x)
            for s, err in out.failed:
                self._fail(s, err)
            alive = [s for s in alive if s.id in out.results]
            x = out.results  # type: ignore[assignment]  # hidden states for the next stage
        chunks = [s for s in alive if s.chunk_end is not None]  # not its last: the token is not theirs
        self.metrics.prefill_chunks.inc(len(chunks))
        alive = [s for s in alive if s.chunk_end is None]
        for s in alive:
            if not s.children:
                token, logprob, top = out.results[s.id]
                self._accept(s, int(token), logprob, ended_in_stages[s.id], top)
        return [s for s in alive if s.children]

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
        reason = s.accept(token, logprob, self.eos, self.max_positions, top)
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
            self._release_one(k, rep, s.id)

    def _release_one(self, k: int, rep: Replica, seq_id: int) -> None:
        task = asyncio.create_task(self.clients.release(rep.node, self.replicas.pools[k].name, [seq_id]))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
