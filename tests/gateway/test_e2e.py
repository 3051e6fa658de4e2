"""The whole stack as real processes on 127.0.0.1: correctness against the PyTorch reference,
streaming, the OpenAI SDK, cancellation on disconnect, replay, bad input and admission. (Over 300
lines: the tests share one stack process set, which is slow to start, so they stay in one module.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from functions.tokenizer_core import TokenizerCore
from tests.conftest import Reference
from tests.helpers.stack import Stack

pytestmark = pytest.mark.processes

PROMPTS = [
    "Hello the model",
    "quick brown fox jumps over the lazy dog today and",
    "café 東京 🙂",
    "a b c d e f g h i j k l m n o p q r s t",
]


@pytest.fixture(scope="module")
def stack(default_stack: Stack) -> Stack:
    return default_stack


@pytest.fixture(scope="module")
def tok(tiny_bundle: Path) -> TokenizerCore:
    return TokenizerCore.from_bundle(tiny_bundle)


def wait_until_released(stack: Stack, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        held = stack.held()
        if all(not v for v in held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def metric(url: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_greedy_equals_reference(stack: Stack, tok: TokenizerCore, reference: Reference) -> None:
    async def one(client: httpx.AsyncClient, text: str, n: int) -> dict:
        r = await client.post(
            f"{stack.gateway_url}/api/model/process",
            json={"text": text, "metadata": {"max_tokens": n, "ignore_eos": True}},
        )
        assert r.status_code == 200, r.text
        return r.json()

    async def main() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c, t, 10 + 3 * i) for i, t in enumerate(PROMPTS)))

    results = asyncio.run(main())
    for i, (text, res) in enumerate(zip(PROMPTS, results, strict=True)):
        ids = tok.encode(text)
        assert res["prompt_tokens"] == len(ids)
        assert res["token_ids"] == reference.greedy(ids, 10 + 3 * i), text
        assert res["completion_tokens"] == 10 + 3 * i and res["finish_reason"] == "length"
        m = res["metrics"]
        assert m["total_ms"] >= m["time_to_first_token_ms"] > 0
        assert set(m["stage_ms"]) == {"stage-1", "stage-2", "stage-3"}
    assert wait_until_released(stack) == {u: {} for u in stack.held()}  # everything freed at the end
    assert metric(stack.gateway_url, "tandem_step_batch_size_count") > 0


def test_token_id_prompts_and_seeded_sampling(stack: Stack, reference: Reference) -> None:
    prompt = [5, 17, 42, 99, 3]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    r = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == 6
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
    sampled = {"prompt": prompt, "max_tokens": 8, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7}
    a = httpx.post(f"{stack.gateway_url}/v1/completions", json=sampled, timeout=30).json()
    b = httpx.post(f"{stack.gateway_url}/v1/completions", json=sampled, timeout=30).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # same seed, same text


def test_stream_concatenates_to_non_stream(stack: Stack) -> None:
    body = {"model": "gpt2", "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=30).json()
    chunks, usage, done = [], None, False
    with httpx.stream(
        "POST",
        f"{stack.gateway_url}/v1/completions",
        timeout=30,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            assert not done
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                chunks.append(chunk["choices"][0])
            else:
                usage = chunk["usage"]
    assert done
    assert "".join(c["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == "length" == full["choices"][0]["finish_reason"]
    assert usage == full["usage"] and usage["completion_tokens"] == 24


def test_openai_sdk(stack: Stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["gpt2"]
    c = client.completions.create(
        model="gpt2", prompt="Hello the model", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert c.usage.completion_tokens == 8 and c.choices[0].finish_reason == "length"
    parts, usage = [], None
    for chunk in client.completions.create(
        model="gpt2",
        prompt="Hello the model",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == c.choices[0].text
    assert usage is not None and usage.completion_tokens == 8
    batch = client.completions.create(
        model="gpt2", prompt=["Hello", "the model"], max_tokens=3, temperature=0
    )
    assert [ch.index for ch in batch.choices] == [0, 1]
    from openai import BadRequestError, NotFoundError

    with pytest.raises(BadRequestError, match="max_tokens"):
        client.completions.create(model="gpt2", prompt="x", max_tokens=-5)
    with pytest.raises(NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_stop_strings(stack: Stack) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    text = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=30).json()["choices"][0][
        "text"
    ]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.fail(f"generated text has no usable stop string: {text!r}")
    r = httpx.post(f"{stack.gateway_url}/v1/completions", json={**body, "stop": [stop]}, timeout=30).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == text[: text.find(stop)]
    chunks = []
    with httpx.stream(
        "POST", f"{stack.gateway_url}/v1/completions", json={**body, "stop": stop, "stream": True}, timeout=30
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == text[: text.find(stop)]
    assert chunks[-1]["finish_reason"] == "stop"


def test_disconnect_cancels_everywhere(stack: Stack) -> None:
    before = metric(stack.gateway_url, "tandem_sequences_cancelled_total")
    body = {"prompt": PROMPTS[0], "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert any(v for v in stack.held().values()), "the sequence should be cached while it runs"
    # the client closed the stream: the sequence is cancelled and freed in every stage
    assert wait_until_released(stack) == {u: {} for u in stack.held()}
    # and a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.gateway_url}/v1/completions",
            timeout=httpx.Timeout(30, read=0.5),
            json={**body, "stream": False},
        )
    assert wait_until_released(stack) == {u: {} for u in stack.held()}
    assert metric(stack.gateway_url, "tandem_sequences_cancelled_total") >= before + 2
    for url in (u for urls in stack.stage_urls.values() for u in urls):
        assert metric(url, "tandem_kv_cache_sequences") == 0


def test_replay_when_a_stage_loses_the_sequence(
    stack: Stack, tok: TokenizerCore, reference: Reference
) -> None:
    """A stage that drops a sequence mid-generation (eviction, restart) costs a replay, not the answer."""
    stage2 = stack.stage_urls["stage-2"][0]
    before = metric(stack.gateway_url, "tandem_replays_total", 'stage="stage-2"')

    async def main() -> dict:
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.create_task(
                c.post(
                    f"{stack.gateway_url}/api/model/process",
                    json={"text": PROMPTS[1], "max_tokens": 300, "ignore_eos": True},
                )
            )
            dropped = False
            while not task.done() and not dropped:
                held = (await c.get(f"{stage2}/v2/models/stage-2/sequences")).json()["sequences"]
                for sid, length in held.items():
                    if length > 20:
                        r = await c.delete(f"{stage2}/v2/models/stage-2/sequences/{sid}")
                        dropped = r.json()["released"]
                await asyncio.sleep(0.005)
            assert dropped, "the generation ended before the test could drop it"
            r = await task
            assert r.status_code == 200, r.text
            return r.json()

    res = asyncio.run(main())
    assert res["token_ids"] == reference.greedy(tok.encode(PROMPTS[1]), 300)
    assert metric(stack.gateway_url, "tandem_replays_total", 'stage="stage-2"') >= before + 1
    assert metric(stage2, "tandem_kv_cache_misses_total") >= 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens must be at least 1"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"prompt": "hi", "max_tokens": 1024}, "context window is 1024"),
        ({"prompt": [7] * 1000, "max_tokens": 30}, "context window"),
        ({"prompt": "", "max_tokens": 3}, "prompt must not be empty"),
        ({"prompt": [], "max_tokens": 3}, "prompt must not be empty"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_k": -7}, "top_k"),
        ({"prompt": "hi", "n": 0}, "n must be in [1, 128]"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": [1, "a"]}, "not a mix"),
        ({"prompt": [10**9]}, "outside the vocabulary"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_completion_parameters(stack: Stack, body: dict, fragment: str) -> None:
    r = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and fragment in err["message"], err


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": ""}, "text must not be empty"),
        ({"text": "hi", "metadata": {"max_tokens": -3}}, "max_tokens"),
        ({"text": "hi", "metadata": {"max_tokens": "many"}}, "metadata.max_tokens"),
        ({"text": "hi", "max_tokens": 5000}, "context window"),
        ({"text": 5}, "text"),
        ({"txt": "hi"}, "txt"),
    ],
)
def test_bad_process_parameters(stack: Stack, body: dict, fragment: str) -> None:
    r = httpx.post(f"{stack.gateway_url}/api/model/process", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.json()["detail"], r.json()


def test_garbage_bodies_do_not_hurt(stack: Stack) -> None:
    for path in ("/v1/completions", "/api/model/process"):
        for content in (b"", b"{", b"\xff\xfe\x00", b"[1,2,3]", b"null", b'{"prompt": "hi"' * 1000):
            r = httpx.post(
                f"{stack.gateway_url}{path}",
                content=content,
                headers={"content-type": "application/json"},
                timeout=10,
            )
            assert 400 <= r.status_code < 500, (path, content[:20], r.status_code, r.text)
    ok = httpx.post(f"{stack.gateway_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200


def test_health_docs_and_metrics(stack: Stack) -> None:
    g = stack.gateway_url
    assert httpx.get(f"{g}/healthz").status_code == 200
    assert httpx.get(f"{g}/readyz").json() == {"ready": True}
    assert httpx.get(f"{g}/docs").status_code == 200
    spec = httpx.get(f"{g}/docs/openapi.json").json()
    assert {"/v1/completions", "/v1/models", "/api/model/process"} <= set(spec["paths"])
    text = httpx.get(f"{g}/metrics").text
    for name in (
        "tandem_requests_total",
        "tandem_request_duration_seconds",
        "tandem_time_to_first_token_seconds",
        "tandem_inter_token_latency_seconds",
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
        "tandem_sequences_running",
        "tandem_sequences_waiting",
        "tandem_stage_call_seconds",
        "tandem_stage_up",
        "tandem_replays_total",
        "process_resident_memory_bytes",
    ):
        assert name in text, name
    assert 'tandem_stage_up{replica="stage-3-r1",stage="stage-3"} 1.0' in text
    stage_text = httpx.get(f"{stack.stage_urls['stage-1'][0]}/metrics").text
    for name in (
        "tandem_stage_infer_seconds",
        "tandem_stage_batch_size",
        "tandem_kv_cache_bytes",
        "tandem_kv_cache_evictions_total",
    ):
        assert name in stage_text, name
