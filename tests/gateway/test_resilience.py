"""Failure handling with real processes on 127.0.0.1: a stage replica killed mid-generation
(failover to another replica, or a restart of the only one, both with replay), a stage down for
longer than `stage_wait`, admission control (429), readiness with a stage that never came up, a
frozen (SIGSTOPped) replica, and a stage with no replica left.

One set of functions (tokenizer, stage-1, two stage-2 replicas, stage-3) serves every test; the
tests that need other gateway settings start their own gateway over (some of) those functions.
(Over 300 lines for the same reason: one shared set of functions.)
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from functions.tokenizer_core import TokenizerCore
from tests.conftest import Reference
from tests.helpers.procs import eventually, free_port, stop_process
from tests.helpers.stack import Stack, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.processes]

PROMPT = "quick brown fox jumps over the lazy dog today and"
N = 300  # long enough that the test can kill a stage while the sequence runs


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tiny_bundle, tmp_path_factory.mktemp("resilience"), replicas=(1, 2, 1))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prompt_ids(tiny_bundle: Path) -> list[int]:
    return TokenizerCore.from_bundle(tiny_bundle).encode(PROMPT)


@pytest.fixture(scope="module")
def expected(reference: Reference, prompt_ids: list[int]) -> list[int]:
    return reference.greedy(prompt_ids, N)


# ---- helpers ----
def metric(url: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def node(stack: Stack, node_id: str) -> tuple[str, int]:
    """(URL, port) of a configured stage replica."""
    address = next(n["address"] for n in stack.config()["nodes"] if n["id"] == node_id)
    return f"http://{address}", int(address.rsplit(":", 1)[1])


def kill(stack: Stack, node_id: str) -> None:
    """SIGKILL: no graceful shutdown, connections just drop."""
    handle = stack.procs[node_id]
    handle.process.kill()
    handle.process.wait()
    stop_process(handle)  # closes its log file


def restart(stack: Stack, node_id: str) -> None:
    """Start a stage replica again on its configured port (no-op when it is running)."""
    if stack.procs[node_id].process.poll() is None:
        return
    _, port = node(stack, node_id)
    stack.start_stage(node_id, int(node_id.split("-")[1]), port)


def single_replica_config(stack: Stack) -> dict:
    cfg = stack.config()
    cfg["nodes"] = [n for n in cfg["nodes"] if n["id"].endswith("-r1")]
    return cfg


def up(url: str, replica: str) -> float:
    return metric(url, "tandem_stage_up", f'replica="{replica}"')


async def kill_once_running(
    c: httpx.AsyncClient, stack: Stack, candidates: list[str], task: asyncio.Task, min_length: int = 20
) -> str:
    """Wait until one of the candidate stage-2 replicas holds the sequence with at least
    `min_length` positions, SIGKILL that replica, and return its id."""
    while not task.done():
        for node_id in candidates:
            url, _ = node(stack, node_id)
            held = (await c.get(f"{url}/v2/models/stage-2/sequences")).json()["sequences"]
            if any(length >= min_length for length in held.values()):
                kill(stack, node_id)
                return node_id
        await asyncio.sleep(0.005)
    pytest.fail(f"the generation ended before the test could kill a replica: {task.result().text[:300]}")


def post_process(c: httpx.AsyncClient, gateway: str, max_tokens: int = N) -> asyncio.Task:
    return asyncio.create_task(
        c.post(
            f"{gateway}/api/model/process",
            json={"text": PROMPT, "max_tokens": max_tokens, "ignore_eos": True},
        )
    )


# ---- 1. failover to another replica ----
@dataclass
class Failover:
    response: httpx.Response
    killed: str  # node id
    before: dict[str, float]  # gateway counters before the kill


@pytest.fixture(scope="module")
def failover(stack: Stack) -> Failover:
    """One long greedy generation whose stage-2 replica is SIGKILLed mid-way."""
    gw = stack.gateway_url
    before = {
        name: metric(gw, name, 'stage="stage-2"')
        for name in ("tandem_failovers_total", "tandem_replays_total")
    }

    async def main() -> tuple[httpx.Response, str]:
        async with httpx.AsyncClient(timeout=60) as c:
            task = post_process(c, gw)
            killed = await kill_once_running(c, stack, ["stage-2-r1", "stage-2-r2"], task)
            return await task, killed

    response, killed = asyncio.run(main())
    return Failover(response, killed, before)


def test_failover_keeps_the_answer(stack: Stack, failover: Failover, expected: list[int]) -> None:
    r = failover.response
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == expected
    assert r.json()["finish_reason"] == "length"
    gw = stack.gateway_url
    assert (
        metric(gw, "tandem_replays_total", 'stage="stage-2"') >= failover.before["tandem_replays_total"] + 1
    )
    eventually(lambda: up(gw, failover.killed) == 0, 3, f"tandem_stage_up for {failover.killed} drops to 0")
    other = "stage-2-r2" if failover.killed == "stage-2-r1" else "stage-2-r1"
    assert up(gw, other) == 1
    assert httpx.get(f"{gw}/readyz", timeout=5).status_code == 200  # the other replica carries stage-2


def test_failover_is_counted(stack: Stack, failover: Failover) -> None:
    assert failover.response.status_code == 200
    after = metric(stack.gateway_url, "tandem_failovers_total", 'stage="stage-2"')
    assert after >= failover.before["tandem_failovers_total"] + 1


def test_killed_replica_comes_back(stack: Stack, failover: Failover, expected: list[int]) -> None:
    gw = stack.gateway_url
    eventually(lambda: up(gw, failover.killed) == 0, 3, f"{failover.killed} marked down")
    t0 = time.monotonic()
    restart(stack, failover.killed)  # same port, so the gateway's config still points at it
    eventually(lambda: up(gw, failover.killed) == 1, 5, f"tandem_stage_up for {failover.killed} back to 1")
    assert time.monotonic() - t0 < 30
    r = httpx.post(
        f"{gw}/api/model/process", json={"text": PROMPT, "max_tokens": 12, "ignore_eos": True}, timeout=30
    )
    assert r.status_code == 200 and r.json()["token_ids"] == expected[:12]


# ---- 2. the only replica of a stage dies ----
@pytest.fixture(scope="module")
def single_gw(stack: Stack) -> str:
    """A gateway that knows one replica per stage (stage-2-r1 only), default stage_wait (10 s)."""
    return stack.start_gateway("gateway-single", single_replica_config(stack))


@pytest.fixture(scope="module")
def short_wait_gw(stack: Stack) -> str:
    """Same replicas, but a sequence waits at most 2 s for a stage with no ready replica."""
    return stack.start_gateway(
        "gateway-short-wait", single_replica_config(stack), env={"TANDEM_STAGE_WAIT": "2"}
    )


def test_only_replica_restarted_mid_generation(stack: Stack, single_gw: str, expected: list[int]) -> None:
    replays = metric(single_gw, "tandem_replays_total", 'stage="stage-2"')

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as c:
            task = post_process(c, single_gw)
            await kill_once_running(c, stack, ["stage-2-r1"], task)
            await asyncio.to_thread(restart, stack, "stage-2-r1")  # right away, same port
            return await task

    try:
        r = asyncio.run(main())
    finally:
        restart(stack, "stage-2-r1")
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == expected
    assert metric(single_gw, "tandem_replays_total", 'stage="stage-2"') >= replays + 1
    eventually(lambda: httpx.get(f"{single_gw}/readyz", timeout=5).status_code == 200, 5, "ready again")


def test_stage_down_longer_than_stage_wait(stack: Stack, short_wait_gw: str, expected: list[int]) -> None:
    gw = short_wait_gw

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as c:
            task = post_process(c, gw)
            await kill_once_running(c, stack, ["stage-2-r1"], task)
            return await task

    try:
        t0 = time.monotonic()
        r = asyncio.run(main())
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 15
        assert r.headers["content-type"].startswith("application/json")
        assert "stage-2" in r.json()["detail"], r.json()

        # the gateway stays alive and says what is missing
        assert httpx.get(f"{gw}/healthz", timeout=5).status_code == 200
        ready = httpx.get(f"{gw}/readyz", timeout=5)
        assert ready.status_code == 503 and "stage-2" in ready.json()["detail"], ready.text
        # a new request while the stage is down: an OpenAI-shaped 503 after stage_wait, not a hang
        t0 = time.monotonic()
        c = httpx.post(f"{gw}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=30)
        assert c.status_code == 503, c.text
        assert time.monotonic() - t0 < 10
        err = c.json()["error"]
        assert "stage-2" in err["message"] and err["code"] == 503, err
        # the failed sequences were released in the stages that are still up
        survivors = [
            node(stack, "stage-1-r1")[0] + "/v2/models/stage-1",
            node(stack, "stage-3-r1")[0] + "/v2/models/stage-3",
        ]
        eventually(
            lambda: all(not httpx.get(f"{u}/sequences", timeout=5).json()["sequences"] for u in survivors),
            5,
            "stage-1 and stage-3 release the failed sequences",
        )
    finally:
        restart(stack, "stage-2-r1")
    eventually(lambda: httpx.get(f"{gw}/readyz", timeout=5).status_code == 200, 5, "ready after the restart")
    r = httpx.post(
        f"{gw}/api/model/process", json={"text": PROMPT, "max_tokens": 20, "ignore_eos": True}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == expected[:20]


# ---- 3. admission control ----
def test_admission_control_answers_429(stack: Stack) -> None:
    gw = stack.start_gateway(
        "gateway-admission", stack.config(), env={"TANDEM_MAX_RUNNING": "1", "TANDEM_MAX_WAITING": "1"}
    )
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{gw}/v1/completions", json=body) for _ in range(4)))

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, [r.text for r in responses]
    assert 429 in statuses and 200 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == 429 and err["message"], err
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
            assert r.json()["choices"][0]["finish_reason"] == "length"
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # greedy: the admitted ones agree
    again = httpx.post(f"{gw}/v1/completions", json={**body, "max_tokens": 5}, timeout=30)
    assert again.status_code == 200, again.text
    assert metric(gw, "tandem_requests_total", 'status="429"') == statuses.count(429)


# ---- 4. readiness with a stage that never came up ----
def test_not_ready_while_a_stage_is_missing(stack: Stack) -> None:
    cfg = stack.config()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    for n in cfg["nodes"]:
        if n["model_part"] == 2:
            n["address"] = dead
    gw = stack.start_gateway("gateway-no-stage-3", cfg, ready_path="/healthz")
    assert httpx.get(f"{gw}/healthz", timeout=5).status_code == 200

    def names_stage_3() -> bool:
        r = httpx.get(f"{gw}/readyz", timeout=5)
        assert r.status_code == 503, r.text
        return "stage-3" in r.json()["detail"]

    eventually(names_stage_3, 10, "/readyz names stage-3")
    t0 = time.monotonic()
    r = httpx.post(f"{gw}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=10)
    assert time.monotonic() - t0 < 3
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == 503 and err["type"] == "server_error" and "stage-3" in err["message"], err
    p = httpx.post(f"{gw}/api/model/process", json={"text": PROMPT, "max_tokens": 5}, timeout=10)
    assert p.status_code == 503 and p.headers["content-type"].startswith("application/json"), p.text
    assert metric(gw, "tandem_stage_up", 'stage="stage-3"') == 0
    assert httpx.get(f"{gw}/healthz", timeout=5).status_code == 200


# ---- 5. a frozen replica, and a stage with no replica left ----
def test_frozen_replica_does_not_stall_the_streams(stack: Stack, expected: list[int]) -> None:
    """8 greedy streams; the stage-2 replica holding some of them is SIGSTOPped (it keeps its
    sockets, answers nothing). Its calls are abandoned when the health check marks it down, the rows
    move to the other replica and replay: every stream ends as a fault-free one does, none waits
    more than a few seconds."""
    gw = stack.gateway_url
    n = 120
    frozen: list[str] = []

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"text": PROMPT, "max_tokens": n, "ignore_eos": True}
            started = time.monotonic()
            tasks = [asyncio.create_task(c.post(f"{gw}/api/model/process", json=body)) for _ in range(8)]
            while not frozen and time.monotonic() - started < 30:
                for node_id in ("stage-2-r1", "stage-2-r2"):
                    url, _ = node(stack, node_id)
                    held = (await c.get(f"{url}/v2/models/stage-2/sequences")).json()["sequences"]
                    if any(length >= 20 for length in held.values()):
                        stack.procs[node_id].process.send_signal(signal.SIGSTOP)
                        frozen.append(node_id)
                        break
                await asyncio.sleep(0.005)
            return await asyncio.gather(*tasks)

    t0 = time.monotonic()
    try:
        responses = asyncio.run(main())
        took = time.monotonic() - t0
    finally:
        for node_id in frozen:
            stack.procs[node_id].process.send_signal(signal.SIGCONT)
    assert frozen, "no stage-2 replica held a sequence long enough to freeze it"
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == expected[:n]
    assert took < 20, f"8 x {n} tokens took {took:.1f} s with a frozen replica (call timeout 60 s)"
    eventually(lambda: up(gw, frozen[0]) == 1, 10, f"{frozen[0]} back after SIGCONT")


def test_no_replica_left_fails_everything_at_once(stack: Stack) -> None:
    """Both stage-2 replicas killed under 4 running requests: all of them fail together with a 503
    within stage_wait (2 s here) + a health interval, new requests are refused at once, and the
    restarted stage brings the service back."""
    gw = stack.start_gateway("gateway-none-left", stack.config(), env={"TANDEM_STAGE_WAIT": "2"})
    body = {"text": PROMPT, "max_tokens": N, "ignore_eos": True}

    async def main() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=60) as c:
            tasks = [asyncio.create_task(c.post(f"{gw}/api/model/process", json=body)) for _ in range(4)]
            await kill_once_running(c, stack, ["stage-2-r1", "stage-2-r2"], tasks[0])
            for node_id in ("stage-2-r1", "stage-2-r2"):
                if stack.procs[node_id].process.poll() is None:
                    kill(stack, node_id)
            killed_at = time.monotonic()
            responses = await asyncio.gather(*tasks)
            return responses, time.monotonic() - killed_at

    try:
        responses, took = asyncio.run(main())
        assert [r.status_code for r in responses] == [503] * 4, [r.text[:200] for r in responses]
        assert all("stage-2" in r.json()["detail"] and "127.0.0.1" not in r.text for r in responses)
        assert took < 8, f"the running requests took {took:.1f} s to fail"
        t0 = time.monotonic()
        refused = httpx.post(f"{gw}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=30)
        assert refused.status_code == 503 and time.monotonic() - t0 < 1, refused.text
        assert "not accepting" in refused.json()["error"]["message"] and refused.headers["retry-after"]
        assert "127.0.0.1" not in refused.text  # no internal address in what clients see
    finally:
        restart(stack, "stage-2-r1")
        restart(stack, "stage-2-r2")
    eventually(
        lambda: httpx.get(f"{gw}/readyz", timeout=5).status_code == 200, 10, "ready after the restarts"
    )
    r = httpx.post(f"{gw}/api/model/process", json={**body, "max_tokens": 10}, timeout=30)
    assert r.status_code == 200, r.text
