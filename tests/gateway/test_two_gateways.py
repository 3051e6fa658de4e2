"""Gateways as deployed, over one set of real stage processes: config.json in the original shape
(model_name and nodes only; the tokenizer at its default address) starts a gateway that serves,
and model_name is held against the bundle; two gateway processes (the Kubernetes deployment runs
two replicas) under concurrent load share the stages without a sequence of one colliding with the
other's (random 62-bit sequence ids), and killing one mid-stream loses only its own requests.

The functions listen on a loopback address of their own (127.x.y.z), so the tokenizer can take
its default port 8100 there while other stacks on this machine hold 127.0.0.1:8100.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions import contract
from tests.gateway.test_e2e import metric
from tests.helpers.procs import free_port, start_process
from tests.helpers.stack import Stack

pytestmark = pytest.mark.slow

PROMPTS = ["Hello the model", "quick brown fox", "café 東京 🙂", "a b c d e", "the stage pipeline", "how are"]
LONG = 300  # tokens per stream: long enough to be mid-stream when a gateway is killed


def original_config(host: str, ports: list[int], model_name: str = "gpt2") -> dict[str, object]:
    """config.json as the original system writes it: no tokenizer, one node per model part."""
    nodes = [{"id": f"node{k + 1}", "address": f"{host}:{p}", "model_part": k} for k, p in enumerate(ports)]
    return {"model_name": model_name, "nodes": nodes}


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    host = f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    s = Stack(tiny_bundle, tmp_path_factory.mktemp("stack") / "config.json")
    try:
        s.tokenizer_url = f"http://{host}:8100"  # the default address's port
        s.procs["tokenizer"] = start_process(
            [
                sys.executable,
                "-m",
                "functions.tokenizer",
                "--bundle",
                str(tiny_bundle),
                "--host",
                host,
                "--port",
                "8100",
            ],
            f"{s.tokenizer_url}/v2/health/ready",
            timeout=60,
        )
        ports = []
        for k in (1, 2, 3):
            ports.append(free_port())
            url = f"http://{host}:{ports[-1]}"
            args = ["--bundle", str(tiny_bundle), "--stage", str(k), "--host", host, "--port", str(ports[-1])]
            s.procs[f"node{k}"] = start_process(
                [sys.executable, "-m", "functions.stage", *args, "--threads", "1"],
                f"{url}/v2/health/ready",
                timeout=60,
            )
            s.stage_urls[contract.stage_name(k)] = [url]
        s.config_path.write_text(json.dumps(original_config(host, ports)))
        s.gateway_url = s.start_gateway("gateway-a", s.config())
        yield s
    finally:
        s.stop()


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def test_the_original_config_starts_a_gateway_that_serves(stack: Stack) -> None:
    cfg = stack.config()
    assert set(cfg) == {"model_name", "nodes"}  # nothing tandem-specific in the file
    r = httpx.post(
        f"{stack.gateway_url}/api/model/process", json={"text": "Hello", "metadata": {"max_tokens": 4}}
    )
    assert r.status_code == 200 and r.json()["completion_tokens"] == 4, r.text
    assert httpx.get(f"{stack.gateway_url}/v1/models").json()["data"][0]["id"] == "gpt2"


def test_a_model_name_that_is_not_the_bundles_keeps_the_gateway_unready(stack: Stack) -> None:
    cfg = {**stack.config(), "model_name": "distilgpt2"}
    url = stack.start_gateway("gateway-wrong-model", cfg, ready_path="/healthz")
    r = httpx.get(f"{url}/readyz")
    for _ in range(100):  # the first discovery takes a moment
        if "model_name" in r.text:
            break
        time.sleep(0.1)
        r = httpx.get(f"{url}/readyz")
    assert r.status_code == 503, r.text
    assert "model_name 'distilgpt2'" in r.text and "short name 'gpt2'" in r.text, r.text
    stack.procs["gateway-wrong-model"].process.send_signal(signal.SIGTERM)


async def streamed(client: httpx.AsyncClient, url: str, prompt: str, started: asyncio.Event) -> str:
    """The text of one streamed greedy completion; sets `started` at its first token."""
    text = []
    async with client.stream("POST", f"{url}/v1/completions", json=body(prompt, LONG, True)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
                started.set()
    return "".join(text)


async def whole(client: httpx.AsyncClient, url: str, prompt: str) -> str:
    r = await client.post(f"{url}/v1/completions", json=body(prompt, LONG, False))
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


async def both_under_load(
    stack: Stack, a: str, b: str
) -> tuple[dict[str, str], list[object], list[object], int]:
    """What A alone gives per prompt; then every prompt streamed through A and B at once, B killed
    once all have started: A's results, B's results (text or exception), the most sequences a
    stage held at once."""
    async with httpx.AsyncClient(timeout=120) as client:
        expected = dict(
            zip(PROMPTS, await asyncio.gather(*(whole(client, a, p) for p in PROMPTS)), strict=True)
        )
        started = {(g, p): asyncio.Event() for g in (a, b) for p in PROMPTS}
        tasks = [asyncio.create_task(streamed(client, g, p, ev)) for (g, p), ev in started.items()]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started.values())), 60)
        held = max(len(seqs) for seqs in stack.held().values())
        stack.procs["gateway-b"].process.send_signal(signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    n = len(PROMPTS)
    return expected, list(results[:n]), list(results[n:]), held


def test_two_gateways_share_the_stages_and_one_dying_loses_only_its_own(stack: Stack) -> None:
    a = stack.gateway_url
    b = stack.start_gateway("gateway-b", stack.config())
    expected, from_a, from_b, held = asyncio.run(both_under_load(stack, a, b))
    # every stream of both gateways was running at once in the same stage processes
    assert held >= 2 * len(PROMPTS) - 2, f"the stages held only {held} sequences at once"
    # gateway A's streams all finished, token for token what A alone gives
    assert from_a == [expected[p] for p in PROMPTS]
    # B's were cut when it died mid-stream: a transport error, or a stream that ended short
    for r, p in zip(from_b, PROMPTS, strict=True):
        assert isinstance(r, httpx.TransportError) or (isinstance(r, str) and r != expected[p]), r
    # no collision: no stage saw a sequence it did not hold, so A replayed nothing
    assert metric(a, "tandem_replays_total") == 0
    for urls in stack.stage_urls.values():
        for url in urls:
            assert metric(url, "tandem_kv_cache_misses_total") == 0, url
    # A keeps serving after B is gone
    r = httpx.post(f"{a}/v1/completions", json=body(PROMPTS[0], LONG, False), timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[PROMPTS[0]]
