"""One batch of sequences through one stage: grouped by the replica each sticks to, replayed after a
409 (the stage lost part of a sequence's KV cache), moved to another replica after a failure, traced
and timed. Rows that cannot be served are returned as failed, with the error to give their clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.propagate import inject

from functions import contract as c
from gateway import scoring
from gateway.clients import Clients, StageConflict, StageRejected
from gateway.config import GatewayConfig
from gateway.deadlines import CallDeadlines
from gateway.errors import GatewayError, StageError, StageTimeoutError, StageUnavailableError
from gateway.metrics import GatewayMetrics
from gateway.processor_inputs import processor_inputs
from gateway.replicas import Replica, Replicas
from gateway.sequence import Sequence, Top
from gateway.tracing import step_traced, unsampled

logger = logging.getLogger("tandem.gateway")
tracer = trace.get_tracer("tandem.gateway")
MAX_REPLAYS = 4  # per stage call: conflicts or failovers before the rows fail


LastResult = tuple[int, float | None, Top | None]


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


@dataclass
class StageOutcome:
    # per row that went through: the new positions' hidden states (n_new, C), or for the last
    # stage (token id, logprob or None, top-N or None)
    results: dict[int, np.ndarray | LastResult] = field(default_factory=dict)
    failed: list[tuple[Sequence, GatewayError]] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        cfg: GatewayConfig,
        clients: Clients,
        replicas: Replicas,
        metrics: GatewayMetrics,
        layout: StageLayout,
        eos: tuple[int, ...] = (),
    ):
        self.cfg, self.clients, self.replicas, self.metrics, self.layout = (
            cfg,
            clients,
            replicas,
            metrics,
            layout,
        )
        self.busy = [0] * cfg.stages  # calls in flight per stage
        self.most_stages_busy = 0  # the most stages with a call in flight at once (pipelining shows)
        self.deadlines = CallDeadlines(
            cfg.stages, cfg.call_deadline_factor, cfg.call_deadline_floor, cfg.call_timeout
        )
        self.eos = eos  # the tokens min_tokens bans

    async def run(self, k: int, rows: list[Sequence], x: dict[int, np.ndarray]) -> StageOutcome:
        """Rows through stage k; `x` holds each row's new inputs for stages after the first (its
        new token ids are in `Sequence.tokens`)."""
        pool = self.replicas.pools[k]
        start = {s.id: s.held[k] for s in rows}  # past length to send; lowered by 409s
        pending = list(rows)
        out = StageOutcome()
        # one wait for the whole batch when the stage has no replica up: every row fails together
        deadline = asyncio.get_running_loop().time() + self.cfg.stage_wait
        for _attempt in range(MAX_REPLAYS + 1):
            groups: dict[str, tuple[Replica, list[Sequence]]] = {}
            for s in pending:
                rep = await self._replica_for(k, s, out, deadline)
                if rep is not None:
                    groups.setdefault(rep.node.id, (rep, []))[1].append(s)
            batches = [(rep, part) for rep, grp in groups.values() for part in self._split(k, grp, x, start)]
            calls = [self._call(k, rep, part, x, start) for rep, part in batches]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            pending = []
            for (rep, grp), outcome in zip(batches, outcomes, strict=True):
                if isinstance(outcome, StageConflict):
                    for s in grp:
                        h = outcome.held.get(s.id)
                        if h is not None:
                            # what the stage holds, when it is a prefix of ours; else from scratch
                            start[s.id] = h if h < start[s.id] else 0
                            self.metrics.replays.labels(pool.name).inc()
                    pending += grp
                elif isinstance(outcome, StageRejected):
                    out.failed += [(s, outcome) for s in grp]
                elif isinstance(outcome, StageError):
                    pool.mark(rep, False, str(outcome))  # its rows move (and count a failover)
                    pending += grp
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    out.results.update(outcome)
            if not pending:
                return out
        err = StageError(f"{pool.name}: gave up after {MAX_REPLAYS} replays/failovers")
        out.failed += [(s, err) for s in pending]
        return out

    async def _replica_for(self, k: int, s: Sequence, out: StageOutcome, deadline: float) -> Replica | None:
        """The replica the sequence sticks to, or a new one when that is down (None: failed)."""
        pool = self.replicas.pools[k]
        rep = s.replica[k]
        if rep is not None and rep.up:
            return rep
        new_rep = await self.replicas.wait_for(pool, s.id, deadline)
        if new_rep is None:
            why = self.replicas.readiness()[1]
            msg = f"{pool.name} has no ready replica (waited {self.cfg.stage_wait:.0f} s): {why}"
            out.failed.append((s, StageUnavailableError(msg)))
            return None
        if rep is not None and new_rep is not rep:
            self.metrics.failovers.labels(pool.name).inc()
            s.left.append((k, rep))
        s.replica[k] = new_rep
        return new_rep

    def _split(
        self, k: int, grp: list[Sequence], x: dict[int, np.ndarray], start: dict[int, int]
    ) -> list[list[Sequence]]:
        """The rows for one replica as calls within the stages' bounds (rows x new positions, and
        rows x (past + new) positions for the KV budget): as they are when they fit (decode steps
        keep their order, which lets a stage reuse its last batch), else longest first, each call as
        full as the bounds allow."""
        new = {s.id: self._row_length(k, s, x, start[s.id]) for s in grp}

        def fits(part: list[Sequence]) -> bool:
            width = max(new[s.id] for s in part)
            past = max(start[s.id] for s in part)
            return (
                len(part) * width <= self.layout.max_batch_tokens
                and len(part) * (past + width) <= self.layout.max_call_positions
            )

        if fits(grp):
            return [grp]
        parts: list[list[Sequence]] = [[]]
        for s in sorted(grp, key=lambda s: (-new[s.id], -start[s.id])):
            if parts[-1] and not fits([*parts[-1], s]):
                parts.append([])
            parts[-1].append(s)
        return parts

    def _row_length(self, k: int, s: Sequence, x: dict[int, np.ndarray], start: int) -> int:
        if k == 0:
            return s.feed_end - start
        return s.held[k] - start + len(x[s.id])

    def _row_input(self, k: int, s: Sequence, x: dict[int, np.ndarray], start: int) -> np.ndarray:
        if k == 0:
            return np.asarray(s.tokens[start : s.feed_end], dtype=np.int64)  # (n,)
        sent = s.sent[k]
        assert sent is not None
        if start == s.held[k]:
            return x[s.id]  # (n, C)
        return np.concatenate([sent.view(start, s.held[k]), x[s.id]])  # (held - start + n, C)

    def _inputs(
        self, k: int, grp: list[Sequence], rows: list[np.ndarray], start: dict[int, int]
    ) -> dict[str, np.ndarray]:
        xin, mask = c.left_pad(rows, None if k == 0 else self.layout.hidden_size)
        inputs = {
            c.SEQUENCE_IDS: np.array([s.id for s in grp], dtype=np.int64),
            c.PAST_LENGTHS: np.array([start[s.id] for s in grp], dtype=np.int64),
            self.layout.input_names[k]: xin,
            c.ATTENTION_MASK: mask,
            c.SEQUENCE_END: np.array([s.last_step for s in grp], dtype=np.bool_),
            # from scratch (a new sequence, or a replay a stage could not continue): say so
            c.SEQUENCE_START: np.array([start[s.id] == 0 for s in grp], dtype=np.bool_),
        }
        if k == self.cfg.stages - 1:
            p = [s.params for s in grp]
            inputs |= {
                c.TEMPERATURE: np.array([q.temperature for q in p], dtype=np.float32),
                c.TOP_K: np.array([q.top_k for q in p], dtype=np.int64),
                c.TOP_P: np.array([q.top_p for q in p], dtype=np.float32),
                c.SEED: np.array([s.seed for s in grp], dtype=np.int64),
            }
            if any(q.processed for q in p):  # penalties, logit_bias, min_tokens: only then
                inputs |= processor_inputs(grp, self.eos)
        return inputs

    async def _call(
        self, k: int, rep: Replica, grp: list[Sequence], x: dict[int, np.ndarray], start: dict[int, int]
    ) -> dict[int, np.ndarray | LastResult]:
        pool = self.replicas.pools[k]
        last = k == self.cfg.stages - 1
        rows = [self._row_input(k, s, x, start[s.id]) for s in grp]
        inputs = self._inputs(k, grp, rows, start)
        scored = scoring.targets(grp, rows, start) if last else None
        if last:  # log-softmax over the vocabulary costs ~1 ms per row: only when someone wants it
            outputs = [c.TOKEN_IDS, c.LOGPROBS] if any(s.params.logprobs for s in grp) else [c.TOKEN_IDS]
            if scoring.wants_top(grp):  # per row: the rows that ask (functions/scoring.py)
                inputs[c.NUM_TOP] = np.array([s.params.top_logprobs for s in grp], dtype=np.int64)
                outputs += [c.TOP_IDS, c.TOP_LOGPROBS]
            if scored is not None:
                inputs[c.TARGET_IDS] = scored[0]
                outputs += [c.TARGET_LOGPROBS, c.TARGET_TOP_IDS, c.TARGET_TOP_LOGPROBS]
        else:
            outputs = [self.layout.output_names[k]]
        headers: dict[str, str] = {}
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        # One span per request in the batch, each in its own request's trace (one trace per
        # request); the stage's server span hangs under the first. Long generations trace only
        # some steps (gateway.tracing); an untraced call tells the stage not to record either.
        parents = [(s.parent, s.n_generated) for s in grp if s.parent is not None and s.parent.is_recording()]
        spans = [
            tracer.start_span(f"{pool.name} call", context=trace.set_span_in_context(parent))
            for parent, step in parents
            if step_traced(step)
        ]
        for span in spans:
            span.set_attribute("tandem.batch_size", len(grp))
            span.set_attribute("tandem.replica", rep.node.id)
        if spans:
            inject(headers, context=trace.set_span_in_context(spans[0]))
        elif parents:
            inject(headers, context=trace.set_span_in_context(unsampled(parents[0][0])))
        task = asyncio.current_task()
        assert task is not None  # run() gathers the calls: each is a task of its own
        rep.calls.add(task)
        S = max(len(r) for r in rows)
        budget = self.deadlines.budget(k, len(grp) * S)
        self.busy[k] += 1
        self.most_stages_busy = max(self.most_stages_busy, sum(1 for n in self.busy if n))
        try:
            if self.cfg.simulated_hop_delay:  # benchmark: the stage as if on another machine
                await asyncio.sleep(self.cfg.simulated_hop_delay)
            async with asyncio.timeout(budget):
                out = await self.clients.infer(rep.node, pool.name, inputs, outputs, headers, timing)
        except TimeoutError:
            self.metrics.deadline_misses.labels(pool.name, rep.node.id).inc()
            raise StageTimeoutError(
                f"{pool.name} replica {rep.node.id!r} did not answer a {len(grp)} x {S} call within "
                f"{budget:.1f} s (its deadline from the stage's recent latency)"
            ) from None
        except asyncio.CancelledError:
            if task not in rep.abandoned:
                raise  # cancelled from outside (shutdown): not this replica's doing
            task.uncancel()
            raise StageUnavailableError(
                f"{pool.name} replica {rep.node.id!r} went down during the call"
            ) from None
        finally:
            self.busy[k] -= 1
            rep.calls.discard(task)
            rep.abandoned.discard(task)
            for span in spans:
                span.end()
        dt = time.perf_counter() - t0
        self.metrics.stage_call.labels(pool.name, rep.node.id).observe(dt)
        if "server" in timing:
            self.metrics.hop_overhead.labels(pool.name).observe(max(dt - timing["server"], 0.0))
        self.deadlines.observe(k, dt, len(grp) * S)
        if scored is not None:
            scoring.record(grp, scored[1], out)
        result: dict[int, np.ndarray | LastResult] = {}
        for b, s in enumerate(grp):
            s.stage_seconds[k] += dt
            n_new = s.feed_end - s.held[0] if k == 0 else len(x[s.id])
            sent = s.sent[k]
            if sent is not None:
                sent.truncate(s.held[k])  # replayed rows were already in the buffer
                sent.append(x[s.id])
            s.held[k] = start[s.id] + len(rows[b])
            if last:
                lp = out[c.LOGPROBS][b] if c.LOGPROBS in out else None
                top = scoring.row_top(out, b, s.params.top_logprobs)
                result[s.id] = (int(out[c.TOKEN_IDS][b]), None if lp is None else float(lp), top)
            else:
                result[s.id] = out[self.layout.output_names[k]][b, S - n_new :]  # (n_new, C)
        return result
