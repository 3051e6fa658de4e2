"""Pipelined micro-batches (pipeline_depth > 1, gateway.scheduler): the running sequences advance in
lanes, so that the stages work on different lanes at the same time; every answer is the same as
with one batch, and cancellation still frees every stage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.test_inproc import greedy, run_to_end, tokens_of
from tests.helpers.inproc import InProcessStack, in_process_stack

PROMPTS = [[5, 17, 42, 99, 7][: 2 + i % 4] + [i + 1] for i in range(6)]
DEPTH = 3


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle, config={"pipeline_depth": DEPTH}) as s:
        s.router.compute_seconds = 0.002  # each stage busy 2 ms per call, one call at a time
        yield s


def test_lanes_keep_every_answer_and_overlap_the_stages(stack: InProcessStack, reference: Any) -> None:
    gw = stack.gateway
    sched = gw.require_scheduler()
    assert len(sched.lanes) == DEPTH
    pipeline = sched.pipeline
    pipeline.most_stages_busy = 0

    async def go() -> list[list[Any]]:

        seqs = sched.submit_all(PROMPTS, greedy(12))
        return await asyncio.gather(*(run_to_end(gw, s) for s in seqs))

    runs = stack.run(go())
    for prompt, events in zip(PROMPTS, runs, strict=True):
        assert tokens_of(events) == reference.greedy(prompt, 12)
    # with one batch, one stage at a time answers; with lanes, stages answered at the same time
    assert pipeline.most_stages_busy >= 2
    assert not sched.running and not sched.waiting


def test_one_lane_runs_one_stage_at_a_time(tiny_bundle: Path, reference: Any) -> None:
    with in_process_stack(tiny_bundle) as one:
        one.router.compute_seconds = 0.002
        gw = one.gateway

        async def go() -> list[list[Any]]:
            import asyncio

            seqs = gw.require_scheduler().submit_all(PROMPTS[:3], greedy(6))
            return await asyncio.gather(*(run_to_end(gw, s) for s in seqs))

        runs = one.run(go())
        assert [tokens_of(e) for e in runs] == [reference.greedy(p, 6) for p in PROMPTS[:3]]
        assert gw.require_scheduler().pipeline.most_stages_busy == 1


def test_a_cancelled_sequence_in_a_lane_is_freed_everywhere(stack: InProcessStack, reference: Any) -> None:
    gw = stack.gateway
    sched = gw.require_scheduler()

    async def read_then_cancel(seq: Any) -> list[Any]:
        events = []
        async for ev in sched.stream(seq):  # the client reads 3 tokens and goes away
            events.append(ev)
            if len(events) == 3:
                sched.cancel(seq)
                break
        return events

    async def go() -> list[list[Any]]:
        seqs = sched.submit_all(PROMPTS[:4], greedy(30))
        return await asyncio.gather(read_then_cancel(seqs[0]), *(run_to_end(gw, s) for s in seqs[1:]))

    runs = stack.run(go())
    assert len(tokens_of(runs[0])) == 3
    for prompt, events in zip(PROMPTS[1:4], runs[1:], strict=True):
        assert tokens_of(events) == reference.greedy(prompt, 30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(stack.held(n) for n in stack.hosts):
        time.sleep(0.02)
    assert {n: stack.held(n) for n in stack.hosts} == {n: {} for n in stack.hosts}
    assert not sched.running and not sched.waiting
