"""Chunked prefill (`prefill_chunk`, gateway.prefill) with the real tokenizer, stage and gateway apps
in one process: a long prompt prefilled a chunk per step gives the same tokens (greedy, seeded,
n > 1) and the same prompt scores as one whole prefill, runs ceil(len / chunk) prefill calls per
stage, lets a running stream keep getting tokens meanwhile, replays when a stage lost it or went
down halfway, and frees every stage when it is cancelled or runs past its deadline halfway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway import prefill
from gateway.config import ConfigError, parse_config
from gateway.errors import StageTimeoutError
from gateway.scheduler import Scheduler
from gateway.sequence import SamplingParams, Sequence
from tests.conftest import Reference
from tests.gateway.test_inproc import greedy, run_to_end, sample, tokens_of
from tests.helpers.inproc import InProcessStack, head_calls, in_process_stack

CHUNK = 8
LONG = [(37 * i + 11) % 500 + 5 for i in range(61)]  # 61 = 7 chunks of 8 + one of 5
STAGES = ("stage-1", "stage-2", "stage-3")
NODES = ("stage-1-r1", "stage-2-r1", "stage-2-r2", "stage-3-r1")
TOL = 1e-3


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    # stage 2 has two replicas (a failover halfway through a prefill)
    with in_process_stack(tiny_bundle, replicas=(1, 2, 1), config={"prefill_chunk": CHUNK}) as s:
        yield s


@contextlib.contextmanager
def chunking(stack: InProcessStack, chunk: int, **more: Any) -> Iterator[Scheduler]:
    """The scheduler with another prefill_chunk (and other knobs) for a while; it reads its
    configuration every step."""
    sched = stack.gateway.require_scheduler()
    saved = sched.cfg
    sched.cfg = dataclasses.replace(saved, prefill_chunk=chunk, **more)
    try:
        yield sched
    finally:
        sched.cfg = saved


def idle(stack: InProcessStack) -> None:
    sched = stack.gateway.require_scheduler()
    deadline = time.monotonic() + 5
    while (sched.running or sched.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sched.running and not sched.waiting


def wait_freed(stack: InProcessStack, seq_id: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(seq_id in stack.held(n) for n in NODES):
        time.sleep(0.01)
    assert {n: stack.held(n).get(seq_id) for n in NODES} == dict.fromkeys(NODES)


def stage_prefills(stack: InProcessStack) -> dict[str, float]:
    """Prefill calls (some row brings more than one position) each stage has answered."""
    out = dict.fromkeys(STAGES, 0.0)
    for node in NODES:
        text = stack.call("GET", "/metrics", host=stack.hosts[node]).text
        for ln in text.splitlines():
            if ln.startswith("tandem_stage_infer_seconds_count{") and 'phase="prefill"' in ln:
                out[node.rsplit("-", 1)[0]] += float(ln.rsplit(" ", 1)[1])
    return out


def generate(stack: InProcessStack, prompt: list[int], params: SamplingParams) -> list[int]:
    gw = stack.gateway

    async def go() -> list[int]:
        (seq,) = gw.require_scheduler().submit_all([prompt], params)
        return tokens_of(await run_to_end(gw, seq))

    return stack.run(go())


# ---- the plan, without stages ----


def test_the_plan_runs_short_prompts_whole_and_long_ones_a_shared_chunk_oldest_first() -> None:
    def seq(n: int, held: int = 0) -> Sequence:
        s = Sequence.new(list(range(n)), greedy(4), None, 3, 4)  # type: ignore[arg-type]
        s.held = [held] * 3
        return s

    a, b, c, d = seq(40), seq(3), seq(30), seq(9, held=8)  # d: a fork's choice, one position
    assert prefill.plan([a, b, c, d], 0) == [a, b, c, d]  # off: every prompt whole
    assert [s.chunk_end for s in (a, b, c, d)] == [None] * 4
    assert prefill.plan([a, b, c, d], 16) == [a, b, d]  # c waits for a
    assert (a.chunk_end, a.feed_end, a.last_step, a.chunked) == (16, 16, False, True)
    assert (b.chunk_end, d.chunk_end) == (None, None)  # whole: they fit in a chunk
    prefill.done([a, b, d])
    assert (a.chunk_end, a.feed_end) == (None, 40)
    a.held = [16] * 3
    assert prefill.plan([a, c], 16) == [a]  # 16 of a's 24
    prefill.done([a])
    a.held = [32] * 3
    assert prefill.plan([a, c], 16) == [a, c]  # a's last 8, then 8 of c: 16 in all
    assert (a.chunk_end, c.chunk_end) == (None, 8)
    prefill.done([a, c])
    assert prefill.plan([seq(16)], 16)[0].chunk_end is None  # exactly a chunk: whole


def test_the_knob_is_validated() -> None:
    cfg = {"model_name": "m", "tokenizer": "t:1", "nodes": [{"id": "a", "address": "a:1", "model_part": 0}]}
    assert parse_config(cfg, env={}).prefill_chunk == 256
    assert parse_config({**cfg, "prefill_chunk": 0}, env={}).prefill_chunk == 0  # off
    assert parse_config(cfg, env={"TANDEM_PREFILL_CHUNK": "64"}).prefill_chunk == 64
    for bad in (-1, 2.5, "x", True):
        with pytest.raises(ConfigError, match="prefill_chunk"):
            parse_config({**cfg, "prefill_chunk": bad}, env={})


# ---- through the stages ----


def test_greedy_and_seeded_tokens_are_the_same_with_and_without_chunks(
    stack: InProcessStack, reference: Reference
) -> None:
    chunks0 = sample(stack, "tandem_prefill_chunks_total")
    chunked = generate(stack, LONG, greedy(10))
    assert sample(stack, "tandem_prefill_chunks_total") == chunks0 + 7  # the chunks before the last
    assert chunked == reference.greedy(LONG, 10)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=4321, ignore_eos=True, top_k=50)
    chunked_sampled = generate(stack, LONG, seeded)
    with chunking(stack, 0):
        assert generate(stack, LONG, greedy(10)) == chunked
        assert generate(stack, LONG, seeded) == chunked_sampled
    assert sample(stack, "tandem_prefill_chunks_total") == chunks0 + 14
    with chunking(stack, 7):  # another chunk size: the last chunk is 5 positions, again
        assert generate(stack, LONG, seeded) == chunked_sampled
    idle(stack)


@pytest.mark.parametrize("how", ["lost", "down"])
def test_a_chunked_prefill_replays_when_a_stage_lost_it_or_went_down_halfway(
    stack: InProcessStack, reference: Reference, how: str
) -> None:
    """After two chunks, the stage-2 replica holding the sequence forgets it (the next chunk's 409
    makes the gateway replay the first chunks there) or stops answering (the sequence moves to the
    other replica and replays there); the tokens are those of a whole prefill."""
    idle(stack)
    sched = stack.gateway.require_scheduler()
    step = sched._step
    box: list[Sequence] = []
    broken: list[str] = []

    async def stepping(rows: list[Sequence], phase: str) -> list[Sequence]:
        out = await step(rows, phase)
        seq = box[0]
        if seq in rows and seq.held[1] == 2 * CHUNK and not broken:
            rep = seq.replica[1]
            assert rep is not None and seq.n_generated == 0
            broken.append(rep.node.id)
            if how == "lost":
                assert stack.engine(rep.node.id).release(seq.id)
            else:
                stack.router.down.add(stack.hosts[rep.node.id])
        return out

    sched._step = stepping  # type: ignore[method-assign]
    replays0 = sample(stack, "tandem_replays_total", stage="stage-2")
    failovers0 = sample(stack, "tandem_failovers_total", stage="stage-2")

    async def go() -> list[int]:
        box.extend(sched.submit_all([LONG], greedy(6)))
        return tokens_of(await run_to_end(stack.gateway, box[0]))

    try:
        tokens = stack.run(go())
    finally:
        del sched._step  # type: ignore[attr-defined]
        stack.router.down.clear()
    assert broken
    assert tokens == reference.greedy(LONG, 6)
    assert sample(stack, "tandem_replays_total", stage="stage-2") == replays0 + 1
    moved = sample(stack, "tandem_failovers_total", stage="stage-2") - failovers0
    assert moved == (1 if how == "down" else 0)
    if how == "down":
        rep = box[0].replica[1]
        assert rep is not None and rep.node.id != broken[0]
        stack.engine(broken[0]).release(box[0].id)  # it was down when the gateway freed it
        pool = sched.replicas.pools[1]
        deadline = time.monotonic() + 5
        while not all(r.up for r in pool.replicas) and time.monotonic() < deadline:
            time.sleep(0.02)
    wait_freed(stack, box[0].id)
    idle(stack)


@pytest.mark.parametrize("chunk", [CHUNK, 0, 16, 61])
def test_a_long_prompt_runs_one_prefill_call_per_chunk_in_every_stage(
    stack: InProcessStack, chunk: int
) -> None:
    idle(stack)
    replays0 = {k: sample(stack, "tandem_replays_total", stage=k) for k in STAGES}
    before = stage_prefills(stack)
    with chunking(stack, chunk):
        generate(stack, LONG, greedy(1))  # the one token comes with the last chunk
    after = stage_prefills(stack)
    calls = math.ceil(len(LONG) / chunk) if chunk else 1
    assert {k: after[k] - before[k] for k in STAGES} == dict.fromkeys(STAGES, calls)
    # each chunk continued from the last: no stage lost a chunk (sequence_end only on the last)
    assert {k: sample(stack, "tandem_replays_total", stage=k) for k in STAGES} == replays0


def count_tokens_during_a_long_prefill(stack: InProcessStack) -> tuple[int, list[int], list[int]]:
    """A short stream runs; after its 2nd token a long prompt arrives. Returns how many tokens the
    running stream got from that arrival to the long prompt's first token (in the scheduler's
    order of accepting tokens), and both sequences' tokens."""
    gw = stack.gateway
    sched = gw.require_scheduler()
    order: list[int] = []
    accept = sched._accept

    def recording(s: Sequence, *args: Any, **kw: Any) -> None:
        order.append(s.id)
        accept(s, *args, **kw)

    sched._accept = recording  # type: ignore[method-assign]
    arrival: list[int] = []
    long_seq: list[Sequence] = []

    async def go() -> tuple[list[int], list[int]]:
        (running,) = sched.submit_all([[5, 17, 42]], greedy(40))

        def arrive(n: int) -> None:
            if n == 2:
                arrival.append(len(order))
                long_seq.extend(sched.submit_all([LONG], greedy(3)))

        first = await run_to_end(gw, running, arrive)
        return tokens_of(first), tokens_of(await run_to_end(gw, long_seq[0]))

    try:
        a, b = stack.run(go())
    finally:
        del sched._accept  # type: ignore[attr-defined]
    later = order[arrival[0] :]
    first_token = later.index(long_seq[0].id)
    others = [i for i in later[:first_token] if i != long_seq[0].id]
    return len(others), a, b


def test_a_running_stream_keeps_getting_tokens_while_a_long_prompt_is_prefilled(
    stack: InProcessStack, reference: Reference
) -> None:
    idle(stack)
    during, running, long_tokens = count_tokens_during_a_long_prefill(stack)
    # a token per step: every chunk before the last is a step (7), plus maybe the step in flight
    assert during >= math.ceil(len(LONG) / CHUNK) - 1, during
    assert running == reference.greedy([5, 17, 42], 40)
    assert long_tokens == reference.greedy(LONG, 3)
    with chunking(stack, 0):  # the whole prefill in one step: the stream waits for it
        during_whole, running, long_tokens = count_tokens_during_a_long_prefill(stack)
    assert during_whole <= 1, during_whole
    assert running == reference.greedy([5, 17, 42], 40)
    assert long_tokens == reference.greedy(LONG, 3)
    idle(stack)


def test_cancelling_a_long_prompt_halfway_through_its_prefill_frees_every_stage(
    stack: InProcessStack,
) -> None:
    idle(stack)
    gw = stack.gateway
    sched = gw.require_scheduler()
    prompt = LONG * 3
    step = sched._step
    held_at_cancel: dict[str, int | None] = {}
    box: list[Sequence] = []

    async def stepping(rows: list[Sequence], phase: str) -> list[Sequence]:
        out = await step(rows, phase)
        seq = box[0]
        if seq in rows and seq.held[-1] >= 2 * CHUNK and not seq.cancelled:  # two chunks in
            nodes = [rep.node.id for rep in seq.replica if rep is not None]
            held_at_cancel.update({n: stack.held(n).get(seq.id) for n in nodes})
            sched.cancel(seq)
        return out

    sched._step = stepping  # type: ignore[method-assign]
    before = sample(stack, "tandem_sequences_cancelled_total")

    async def go() -> Sequence:
        box.extend(sched.submit_all([prompt], greedy(5)))
        while not box[0].finished:
            await asyncio.sleep(0.005)
        return box[0]

    try:
        seq = stack.run(go())
    finally:
        del sched._step  # type: ignore[attr-defined]
    assert list(held_at_cancel.values()) == [2 * CHUNK] * 3  # the stages held its first chunks
    assert seq.n_generated == 0 and seq.events.empty()  # no token, nothing for a client gone away
    wait_freed(stack, seq.id)
    assert sample(stack, "tandem_sequences_cancelled_total") == before + 1
    idle(stack)


def test_a_long_prefill_past_the_request_deadline_fails_and_frees_every_stage(stack: InProcessStack) -> None:
    idle(stack)
    gw = stack.gateway
    stack.router.compute_seconds = 0.01  # each stage call at least 10 ms: 24 chunks take > 0.7 s

    async def go() -> tuple[Sequence, list[Any]]:
        (seq,) = gw.require_scheduler().submit_all([LONG * 3], greedy(5))
        return seq, await run_to_end(gw, seq)

    try:
        with chunking(stack, CHUNK, request_timeout=0.2):
            seq, events = stack.run(go())
    finally:
        stack.router.compute_seconds = 0.0
    assert [e.kind for e in events] == ["error"]
    assert isinstance(events[0].error, StageTimeoutError)
    assert 0 < seq.held[0] < len(LONG) * 3  # it failed halfway through its prefill
    wait_freed(stack, seq.id)
    idle(stack)


def test_prompt_scores_are_the_same_with_and_without_chunks_each_position_once(
    stack: InProcessStack, reference: Reference
) -> None:
    def score() -> dict[str, Any]:
        body = {"prompt": LONG, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
        r = stack.call("POST", "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        lp: dict[str, Any] = r.json()["choices"][0]["logprobs"]
        return lp

    chunks0 = sample(stack, "tandem_prefill_chunks_total")
    with head_calls(stack, "stage-3-r1") as scored:
        chunked = score()
        assert sample(stack, "tandem_prefill_chunks_total") == chunks0 + 7
        assert sum(scored) == len(LONG) - 1  # every prompt position exactly once, over 8 calls
        assert len(scored) == 8
        with chunking(stack, 0):
            whole = score()
    assert chunked["tokens"] == whole["tokens"]
    assert chunked["token_logprobs"][0] is None and whole["token_logprobs"][0] is None
    got, want = np.array(chunked["token_logprobs"][1:]), np.array(whole["token_logprobs"][1:])
    assert np.abs(got - want).max() <= 1e-4
    ref = reference.logprobs(LONG)
    assert np.abs(got - ref[np.arange(len(LONG) - 1), LONG[1:]]).max() <= TOL
    for a, b in zip(chunked["top_logprobs"][1:], whole["top_logprobs"][1:], strict=True):
        assert a.keys() == b.keys()
    idle(stack)


def test_n3_choices_share_one_chunked_prefill(stack: InProcessStack) -> None:
    def texts(**body: Any) -> list[str]:
        r = stack.call(
            "POST",
            "/v1/completions",
            json={"prompt": LONG, "max_tokens": 6, "ignore_eos": True, "n": 3, "seed": 99, **body},
        )
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

    idle(stack)
    before = stage_prefills(stack)
    chunked = texts()
    after = stage_prefills(stack)
    # the fork parent prefills LONG[:-1] (60 positions) in chunks, once for the three choices
    calls = math.ceil((len(LONG) - 1) / CHUNK)
    assert {k: after[k] - before[k] for k in STAGES} == dict.fromkeys(STAGES, calls)
    assert len(set(chunked)) == 3
    with chunking(stack, 0):
        assert texts() == chunked
    idle(stack)
    for n in NODES:
        assert stack.held(n) == {}, (n, stack.held(n))
