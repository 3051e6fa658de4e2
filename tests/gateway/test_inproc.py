"""The gateway's hot path with the real tokenizer and stage apps in one process (no sockets):
replay after a stage lost a sequence, failover to a second replica, stop strings across token
boundaries, cancellation freeing every stage, atomic admission, and request counting by status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ClientClosedError
from gateway.sequence import Event, SamplingParams, Sequence
from gateway.service import Gateway
from tests.helpers.inproc import InProcessStack, in_process_stack

PROMPT = [5, 17, 42, 99, 7]
NODES = ("stage-1-r1", "stage-2-r1", "stage-2-r2", "stage-3-r1")


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    # stage 2 has two replicas; 6 sequence slots in all (4 running + 2 waiting)
    with in_process_stack(tiny_bundle, replicas=(1, 2, 1), config={"max_running": 4, "max_waiting": 2}) as s:
        yield s


def greedy(max_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop, ignore_eos=True)


async def run_to_end(gw: Gateway, seq: Sequence, after_token: Any = None) -> list[Event]:
    """Every event of one sequence; `after_token(n)` runs after the n-th token event."""
    assert gw.scheduler is not None
    events, n = [], 0
    async for ev in gw.scheduler.stream(seq):
        events.append(ev)
        if ev.kind == "token":
            n += 1
            if after_token is not None:
                after_token(n)
    return events


def tokens_of(events: list[Event]) -> list[int]:
    return [e.token_id for e in events if e.kind == "token"]


def sample(stack: InProcessStack, name: str, **labels: str) -> float:
    registry_text = stack.run(_metrics_text(stack))
    for line in registry_text.splitlines():
        if line.split("{")[0].split(" ")[0] == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _metrics_text(stack: InProcessStack) -> str:
    async with stack.client() as c:
        return (await c.get("/metrics")).text


def wait_freed(stack: InProcessStack, seq_id: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(seq_id not in stack.held(n) for n in NODES):
            return
        time.sleep(0.01)
    raise AssertionError({n: stack.held(n) for n in NODES})


def test_greedy_completion_equals_the_reference(stack: InProcessStack, reference: Any) -> None:
    async def go() -> dict[str, Any]:
        async with stack.client() as c:
            r = await c.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            )
            assert r.status_code == 200, r.text
            return r.json()

    t0 = time.perf_counter()
    body = stack.run(go())
    assert time.perf_counter() - t0 < 1.0
    gw = stack.gateway
    assert body["usage"]["completion_tokens"] == 8
    expected = reference.greedy(PROMPT, 8)
    assert body["choices"][0]["text"] == gw.tokenizer.decode(expected)


def test_replay_after_a_stage_lost_the_sequence(stack: InProcessStack, reference: Any) -> None:
    gw = stack.gateway
    before = sample(stack, "tandem_replays_total", stage="stage-3")

    async def go() -> list[Event]:
        (seq,) = gw.require_scheduler().submit_all([PROMPT], greedy(10))

        def lose(n: int) -> None:
            if n == 4:  # stage 3 forgets the sequence, as after an eviction or a restart
                assert stack.engine("stage-3-r1").release(seq.id)

        return await run_to_end(gw, seq, lose)

    t0 = time.perf_counter()
    events = stack.run(go())
    assert time.perf_counter() - t0 < 1.0
    assert tokens_of(events) == reference.greedy(PROMPT, 10)
    assert events[-1].finish_reason == "length"
    assert sample(stack, "tandem_replays_total", stage="stage-3") == before + 1


def run_breaking_its_replica(
    stack: InProcessStack, max_tokens: int, at: int, broken: set[str], timeout: float = 30.0
) -> tuple[list[Event], str, float]:
    """One greedy sequence of PROMPT; after its `at`-th token the stage-2 replica holding it goes
    into `broken` (the router's `down` or `hung` set, emptied again at the end). Returns the events,
    that replica's id and the seconds the sequence took."""
    gw = stack.gateway
    broke: list[str] = []

    async def go() -> list[Event]:
        (seq,) = gw.require_scheduler().submit_all([PROMPT], greedy(max_tokens))

        def brk(n: int) -> None:
            if n == at:
                rep = seq.replica[1]
                assert rep is not None
                broke.append(rep.node.id)
                broken.add(stack.hosts[rep.node.id])

        return await run_to_end(gw, seq, brk)

    try:
        t0 = time.perf_counter()
        events = stack.run(go(), timeout=timeout)
        return events, broke[0], time.perf_counter() - t0
    finally:
        broken.clear()


def test_failover_to_the_other_replica(stack: InProcessStack, reference: Any) -> None:
    before = sample(stack, "tandem_failovers_total", stage="stage-2")
    # the replica holding the sequence stops answering (refuses connections) after 3 tokens
    events, down, took = run_breaking_its_replica(stack, 10, 3, stack.router.down)
    assert took < 1.0
    assert tokens_of(events) == reference.greedy(PROMPT, 10)
    assert sample(stack, "tandem_failovers_total", stage="stage-2") == before + 1
    survivor = next(n for n in ("stage-2-r1", "stage-2-r2") if n != down)
    assert stack.router.calls[stack.hosts[survivor]] > 0


def test_stop_string_across_a_token_boundary(stack: InProcessStack) -> None:
    gw = stack.gateway

    async def pieces(stop: tuple[str, ...]) -> list[Event]:
        (seq,) = gw.require_scheduler().submit_all([PROMPT], greedy(24, stop))
        return await run_to_end(gw, seq)

    free = stack.run(pieces(()))
    texts = [e.text for e in free if e.kind == "token"]
    full = "".join(texts)
    # a stop string made of the end of one token's text and the start of the next one's
    for i in range(1, len(texts) - 1):
        a, b = texts[i], texts[i + 1]
        if len(a) >= 2 and b:
            stop = a[-2:] + b[:1]
            if full.find(stop) == len("".join(texts[:i])) + len(a) - 2:  # first occurrence is there
                break
    else:
        pytest.fail(f"no two neighbouring tokens with text to cross: {texts}")
    t0 = time.perf_counter()
    stopped = stack.run(pieces((stop,)))
    assert time.perf_counter() - t0 < 1.0
    assert stopped[-1].finish_reason == "stop"
    out = "".join(e.text for e in stopped if e.kind == "token")
    assert out == full[: full.find(stop)]
    # held back while it could still become the stop string: no streamed piece ever carried it
    assert all(stop[:2] not in e.text or e is stopped[-2] for e in stopped if e.kind == "token")


def test_cancellation_frees_every_stage(stack: InProcessStack) -> None:
    gw = stack.gateway
    before = sample(stack, "tandem_sequences_cancelled_total")

    async def go() -> int:
        (seq,) = await gw.admit(greedy(200), ids=[PROMPT])

        async def client_goes_away() -> None:
            while seq.n_generated < 3:
                await asyncio.sleep(0.001)

        with pytest.raises(ClientClosedError):
            await gw.collect([seq], client_goes_away)
        return seq.id

    t0 = time.perf_counter()
    seq_id = stack.run(go())
    wait_freed(stack, seq_id)
    assert time.perf_counter() - t0 < 1.0
    assert sample(stack, "tandem_sequences_cancelled_total") == before + 1


def test_a_streaming_client_that_disconnects_frees_every_stage(stack: InProcessStack) -> None:
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode()
    sent: list[dict[str, Any]] = []
    before = {n: stack.held(n) for n in NODES}  # other tests' leftovers (a replica down at release)

    async def go() -> None:
        chunks = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await chunks.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body")) >= 3:
                chunks.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
            "client": ("127.0.0.1", 1),
            "server": ("gateway", 8000),
            "state": {},
        }
        await asyncio.wait_for(stack.gateway_app(scope, receive, send), 5)  # type: ignore[arg-type]

    t0 = time.perf_counter()
    stack.run(go())
    assert sent[0]["status"] == 200
    sched = stack.gateway.require_scheduler()
    deadline = time.monotonic() + 5
    while (sched.running or sched.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sched.running and not sched.waiting
    for n in NODES:
        deadline = time.monotonic() + 5
        while stack.held(n) != before[n] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stack.held(n) == before[n], n
    assert time.perf_counter() - t0 < 1.0


def test_admission_is_all_or_nothing(stack: InProcessStack) -> None:
    before = sample(stack, "tandem_requests_total", route="/v1/completions", status="429")

    async def go() -> tuple[int, dict[str, Any], int, int]:
        async with stack.client() as c:
            r = await c.post("/v1/completions", json={"prompt": [PROMPT] * 7, "max_tokens": 2})
            sched = stack.gateway.require_scheduler()
            return r.status_code, r.json(), len(sched.running), len(sched.waiting)

    t0 = time.perf_counter()
    status, body, running, waiting = stack.run(go())
    assert time.perf_counter() - t0 < 1.0
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "7 slot(s)" in body["error"]["message"]
    assert (running, waiting) == (0, 0)  # nothing of the refused request was queued
    assert sample(stack, "tandem_requests_total", route="/v1/completions", status="429") == before + 1

    async def six() -> int:
        async with stack.client() as c:
            r = await c.post("/v1/completions", json={"prompt": [PROMPT] * 6, "max_tokens": 2})
            return r.status_code

    assert stack.run(six()) == 200  # exactly the free slots: admitted


@pytest.mark.parametrize(
    ("route", "payload", "status"),
    [
        ("/api/model/process", {"text": "hello", "max_tokens": 0}, 400),
        ("/api/model/process", {"text": "hello", "metadata": {"top_p": "x"}}, 400),
        ("/api/model/process", {"text": ""}, 400),
        ("/api/model/process", {"nope": 1}, 400),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
        ("/v1/completions", {"prompt": "hi", "model": "other"}, 404),
    ],
)
def test_refused_requests_are_counted_with_their_status(
    stack: InProcessStack, route: str, payload: dict[str, Any], status: int
) -> None:
    before = sample(stack, "tandem_requests_total", route=route, status=str(status))

    async def go() -> tuple[int, dict[str, Any], str]:
        async with stack.client() as c:
            r = await c.post(route, json=payload)
            return r.status_code, r.json(), r.headers["content-type"]

    code, body, media = stack.run(go())
    assert code == status
    if route.startswith("/v1/"):
        assert body["error"]["code"] == status and body["error"]["message"]
    else:
        assert media.startswith("application/json") and body["status"] == status and body["detail"]
    assert sample(stack, "tandem_requests_total", route=route, status=str(status)) == before + 1


def test_request_deadline_is_a_504_and_frees_the_stages(stack: InProcessStack) -> None:
    gw = stack.gateway
    sched = gw.require_scheduler()
    cfg = sched.cfg
    sched.cfg = dataclasses.replace(cfg, request_timeout=0.2)

    async def go() -> tuple[Any, Any, int]:
        async with stack.client() as c:
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
            slow = greedy(40)
            (seq,) = sched.submit_all([PROMPT], slow)

            def stall(n: int) -> None:
                if n == 2:
                    time.sleep(0.3)  # the loop is held past the deadline mid-generation

            events = await run_to_end(gw, seq, stall)
            sched.cfg = dataclasses.replace(cfg, request_timeout=1e-6)
            return events, await c.post("/v1/completions", json=body), seq.id

    try:
        events, r, seq_id = stack.run(go())
    finally:
        sched.cfg = cfg
    assert events[-1].kind == "error" and events[-1].error is not None
    assert events[-1].error.status_code == 504 and "request_timeout (0.2 s)" in events[-1].error.message
    assert 0 < len(tokens_of(events)) < 40
    assert r.status_code == 504 and "request_timeout" in r.json()["error"]["message"], r.text
    wait_freed(stack, seq_id)
