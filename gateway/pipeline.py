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

from functions import contract as c
from gateway import scoring
from gateway.call_inputs import Inputs, StageLayout, row_input, split_rows, stage_inputs, stage_outputs
from gateway.clients import Clients, StageConflict, StageRejected
from gateway.config import GatewayConfig
from gateway.deadlines import CallDeadlines
from gateway.errors import GatewayError, StageError, StageTimeoutError, StageUnavailableError
from gateway.metrics import GatewayMetrics
from gateway.replicas import Replica, Replicas
from gateway.sequence import Sequence, Top
from gateway.tracing import call_spans

logger = logging.getLogger("tandem.gateway")
MAX_REPLAYS = 4  # per stage call: conflicts or failovers before the rows fail


LastResult = tuple[int, float | None, Top | None]


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
            batches = [
                (rep, part)
                for rep, grp in groups.values()
                for part in split_rows(self.layout, k, grp, x, start)
            ]
            calls = [self._call(k, rep, part, x, start) for rep, part in batches]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            pending = []
            for (rep, grp), outcome in zip(batches, outcomes, strict=True):
                pending += self._settle(k, rep, grp, outcome, start, out)
            if not pending:
                return out
        err = StageError(f"{self.replicas.pools[k].name}: gave up after {MAX_REPLAYS} replays/failovers")
        out.failed += [(s, err) for s in pending]
        return out

    def _settle(
        self,
        k: int,
        rep: Replica,
        grp: list[Sequence],
        outcome: dict[int, np.ndarray | LastResult] | BaseException,
        start: dict[int, int],
        out: StageOutcome,
    ) -> list[Sequence]:
        """Book one call's outcome; the rows to try again (replay from what the stage holds after a
        409, or on another replica after a failure)."""
        pool = self.replicas.pools[k]
        if isinstance(outcome, StageConflict):
            for s in grp:
                h = outcome.held.get(s.id)
                if h is not None:
                    # what the stage holds, when it is a prefix of ours; else from scratch
                    start[s.id] = h if h < start[s.id] else 0
                    self.metrics.replays.labels(pool.name).inc()
            return grp
        if isinstance(outcome, StageRejected):
            out.failed += [(s, outcome) for s in grp]
            return []
        if isinstance(outcome, StageError):
            pool.mark(rep, False, str(outcome))  # its rows move (and count a failover)
            return grp
        if isinstance(outcome, BaseException):
            raise outcome
        out.results.update(outcome)
        return []

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

    async def _call(
        self, k: int, rep: Replica, grp: list[Sequence], x: dict[int, np.ndarray], start: dict[int, int]
    ) -> dict[int, np.ndarray | LastResult]:
        rows = [row_input(k, s, x, start[s.id]) for s in grp]
        inputs = stage_inputs(self.layout, k, grp, rows, start, self.eos)
        outputs, scored = stage_outputs(self.layout, k, grp, rows, start, inputs)
        headers: dict[str, str] = {}
        spans = call_spans(self.replicas.pools[k].name, rep.node.id, grp, headers)
        S = max(len(r) for r in rows)
        t0 = time.perf_counter()
        try:
            out, server = await self._send(k, rep, len(grp), S, inputs, outputs, headers)
        finally:
            for span in spans:
                span.end()
        dt = time.perf_counter() - t0
        pool = self.replicas.pools[k]
        self.metrics.stage_call.labels(pool.name, rep.node.id).observe(dt)
        if server is not None:
            self.metrics.hop_overhead.labels(pool.name).observe(max(dt - server, 0.0))
        self.deadlines.observe(k, dt, len(grp) * S)
        if scored is not None:
            scoring.record(grp, scored[1], out)
        return self._results(k, grp, rows, x, start, out, dt)

    async def _send(
        self,
        k: int,
        rep: Replica,
        B: int,
        S: int,
        inputs: Inputs,
        outputs: list[str],
        headers: dict[str, str],
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """The call itself, within the stage's deadline, cancelled if its replica goes down
        meanwhile; the answer and the stage's own seconds in its session (when it says)."""
        pool = self.replicas.pools[k]
        task = asyncio.current_task()
        assert task is not None  # run() gathers the calls: each is a task of its own
        rep.calls.add(task)
        budget = self.deadlines.budget(k, B * S)
        timing: dict[str, float] = {}
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
                f"{pool.name} replica {rep.node.id!r} did not answer a {B} x {S} call within "
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
        return out, timing.get("server")

    def _results(
        self,
        k: int,
        grp: list[Sequence],
        rows: list[np.ndarray],
        x: dict[int, np.ndarray],
        start: dict[int, int],
        out: dict[str, np.ndarray],
        dt: float,
    ) -> dict[int, np.ndarray | LastResult]:
        """Each row's result from a successful call, and what the stage now holds for it."""
        last = k == self.cfg.stages - 1
        S = max(len(r) for r in rows)
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
