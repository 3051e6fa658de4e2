"""Schemathesis against the OpenAPI schemas a real gateway and a real tokenizer function publish
(GET /docs/openapi.json), on a whole stack of processes (tests/helpers/stack.py) serving the tiny
model as a chat model (tests/helpers/chat.py), so chat completions render and generate; the chat
route gets its own run of CASES cases besides the whole schema's.

Every operation gets cases generated from its schema, valid ones and ones that break it (wrong
types, missing fields, values out of range), derandomized so CI sends the same cases every run.
Each answer must be below 500 (a 503 would mean a stage is down, and none is), every 4xx a JSON
body with a message, every event stream well formed and ended by `data: [DONE]` with no error
event of 5xx; every process stays up and still serves afterwards. Generation is kept short: the
gateway generates 2 tokens unless asked, and generated `max_tokens` are capped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from tests.helpers.procs import ProcessHandle
from tests.helpers.stack import Stack, start_stack

pytestmark = pytest.mark.slow

CASES = 2000  # per service
MAX_TOKENS = 3  # generated max_tokens above this are capped (each token is a pass through 3 stages)
TIMEOUT = 30.0  # per request
SCHEMA_PATH = "/docs/openapi.json"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROLES = ("system", "user", "assistant")


@pytest.fixture(scope="module")
def stack(chat_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        chat_bundle, tmp_path_factory.mktemp("fuzz-stack"), gateway_env={"TANDEM_DEFAULT_MAX_TOKENS": "2"}
    )
    try:
        yield s
    finally:
        s.stop()


def cap_generation(case: Case) -> None:
    """Cap integer max_tokens (top level, and in /api/model/process metadata) so a case generates a
    few tokens, not a thousand; wrong types and negative values stay as generated."""
    body = case.body
    for holder in (body, body.get("metadata") if isinstance(body, dict) else None):
        if isinstance(holder, dict):
            for key in ("max_tokens", "max_completion_tokens"):
                value = holder.get(key)
                if type(value) is int and value > MAX_TOKENS:
                    holder[key] = MAX_TOKENS


# fields /v1/completions refuses with a 400 (echo, best_of > n when streaming, ...) or often out of range (temperature,
# an unknown model name): dropped from the streaming cases, the other cases cover them
REFUSED = "n echo best_of logit_bias suffix presence_penalty frequency_penalty logprobs".split()
REFUSED += ["model", "temperature", "top_p", "top_k"]


def streaming(case: Case) -> Case:
    """A generated completion request made to stream, without the fields that would refuse it, so
    event streams are generated (and checked) often, not only when the schema's booleans say so."""
    if isinstance(case.body, dict):
        for key in REFUSED:
            case.body.pop(key, None)
        case.body["stream"] = True
        if type(case.body.get("max_tokens")) is int:
            case.body["max_tokens"] = min(max(case.body["max_tokens"], 1), MAX_TOKENS)
        if "prompt" in case.body and not isinstance(
            case.body["prompt"], str
        ):  # ids: mostly beyond the vocabulary
            case.body["prompt"] = str(case.body.get("prompt"))[:40]
    return case


CHAT_REFUSED = "tools functions tool_choice function_call response_format chat_template".split()
CHAT_REFUSED += ["continue_final_message", "top_logprobs", "chat_template_kwargs"]


def chatting(case: Case) -> Case:
    """A generated chat request with roles the route takes and string contents, without the fields
    that would refuse it, so that most of them render the template and generate."""
    if isinstance(case.body, dict):
        for key in CHAT_REFUSED:
            case.body.pop(key, None)
        messages = case.body.get("messages")
        if isinstance(messages, list):
            for i, m in enumerate(messages):
                if isinstance(m, dict):
                    m["role"] = ROLES[i % 3]
                    if not isinstance(m.get("content"), str):
                        m["content"] = str(m.get("content"))[:40]
    return case


def chat_streaming(case: Case) -> Case:
    case = chatting(streaming(case))
    if isinstance(case.body, dict) and type(case.body.get("max_completion_tokens")) is int:
        case.body["max_completion_tokens"] = min(max(case.body["max_completion_tokens"], 1), MAX_TOKENS)
    return case


def send(client: httpx.Client, case: Case, base_url: str) -> httpx.Response:
    kw = case.as_transport_kwargs(base_url=base_url)
    data = kw.get("data")
    assert not kw.get("cookies"), "no operation takes cookies"
    return client.request(
        kw["method"],
        kw["url"],
        headers=kw.get("headers"),
        params=kw.get("params"),
        json=kw["json"] if "json" in kw else None,
        content=data if isinstance(data, bytes | str) else None,
        data=data if isinstance(data, dict) else None,
    )


def message_of(body: Any) -> str | None:
    """The message of an error body: OpenAI's error.message or the problem's detail."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    detail = body.get("detail")
    return detail if isinstance(detail, str) else None


def check_response(r: httpx.Response) -> str | None:
    """What is wrong with an answer, or None."""
    media = r.headers.get("content-type", "")
    if r.status_code >= 500:
        return f"{r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        if not media.startswith(("application/json", "application/problem+json")):
            return f"{r.status_code} with content-type {media!r}: {r.text[:200]!r}"
        try:
            body = r.json()
        except ValueError:
            return f"{r.status_code} body is not JSON: {r.text[:200]!r}"
        if not message_of(body):
            return f"{r.status_code} without a message: {r.text[:200]!r}"
        return None
    if media.startswith("text/event-stream"):
        return check_event_stream(r.text)
    return None


def check_event_stream(text: str) -> str | None:
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"event stream does not end with [DONE]: {text[-200:]!r}"
    for event in events[:-1]:
        try:
            chunk = json.loads(event)
        except ValueError:
            return f"event is not JSON: {event[:200]!r}"
        err = chunk.get("error") if isinstance(chunk, dict) else None
        if isinstance(err, dict) and (not isinstance(err.get("code"), int) or err["code"] >= 500):
            return f"error event in the stream: {event[:300]}"
    return None


def fuzz(base_url: str, procs: dict[str, ProcessHandle], label: str, only: str | None = None) -> None:
    """CASES cases over every operation of the service's schema (or only the one at path `only`)."""
    schema = schemathesis.openapi.from_url(f"{base_url}{SCHEMA_PATH}", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if only is None or op.path == only]
    strategies = [
        op.as_strategy(mode)
        for op in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    posts = [op for op in operations if op.method.upper() == "POST"]
    strategies += [
        op.as_strategy(GenerationMode.POSITIVE).map(streaming) for op in posts if op.path == COMPLETIONS
    ] * 2
    for variant in (chatting, chat_streaming):
        strategies += [
            op.as_strategy(GenerationMode.POSITIVE).map(variant) for op in posts if op.path == CHAT
        ] * 2
    statuses: dict[tuple[str, int], int] = {}
    failures: list[str] = []
    streams = 0
    client = httpx.Client(timeout=TIMEOUT)
    t0 = time.monotonic()

    @settings(
        max_examples=CASES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(strategies))
    def run(case: Case) -> None:
        nonlocal streams
        cap_generation(case)
        what = f"{case.method} {case.path}"
        try:
            r = send(client, case, base_url)
        except httpx.HTTPError as e:
            failures.append(
                f"{what}: no answer ({e!r}); reproduce with {case.as_curl_command(base_url=base_url)}"
            )
        else:
            statuses[what, r.status_code] = statuses.get((what, r.status_code), 0) + 1
            streams += r.headers.get("content-type", "").startswith("text/event-stream")
            problem = check_response(r)
            if problem:
                failures.append(
                    f"{what}: {problem}; reproduce with {case.as_curl_command(base_url=base_url)}"
                )
        dead = {name: h.process.returncode for name, h in procs.items() if h.process.poll() is not None}
        if dead:
            tails = "\n".join(f"--- {n}:\n{procs[n].stderr_tail()}" for n in dead)
            raise AssertionError(
                f"processes exited {dead} after {what}; earlier failures: {failures}\n{tails}"
            )

    try:
        run()
    finally:
        client.close()
    count = sum(statuses.values()) + sum(f.count("no answer") for f in failures)
    print(f"\n{label}: {count} cases over {len(operations)} operations in {time.monotonic() - t0:.1f} s")
    for (what, status), n in sorted(statuses.items()):
        print(f"  {what:28} {status}: {n}")
    print(f"  event streams checked: {streams}")
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:20])
    assert count >= 1000, f"only {count} cases ran"


def assert_all_serve(stack: Stack) -> None:
    for name, h in stack.procs.items():
        assert h.process.poll() is None, f"{name} exited with {h.process.returncode}:\n{h.stderr_tail()}"
    assert httpx.get(f"{stack.tokenizer_url}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{stack.gateway_url}/readyz", timeout=5).status_code == 200
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    r = httpx.post(f"{stack.gateway_url}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT)
    assert r.status_code == 200 and check_event_stream(r.text) is None, r.text


def test_gateway_schema_fuzz(stack: Stack) -> None:
    fuzz(stack.gateway_url, stack.procs, "gateway schema fuzz")
    assert_all_serve(stack)


def test_chat_completions_schema_fuzz(stack: Stack) -> None:
    fuzz(stack.gateway_url, stack.procs, "chat completions schema fuzz", only=CHAT)
    assert_all_serve(stack)


def test_tokenizer_schema_fuzz(stack: Stack) -> None:
    fuzz(stack.tokenizer_url, stack.procs, "tokenizer schema fuzz")
    assert_all_serve(stack)


def test_odd_unknown_field_names_get_an_answer(stack: Stack) -> None:
    # found by the gateway fuzz: an unknown field named with a newline went into
    # X-Tandem-Ignored-Fields as is, and the server closed the connection without an answer
    body = {"prompt": "Hi", "max_tokens": 1, "\u0089V\n-\u00f2": [], "\ud83d\ude00": 1}
    for stream in (False, True):
        r = httpx.post(
            f"{stack.gateway_url}/v1/completions",
            content=json.dumps({**body, "stream": stream}),
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-tandem-ignored-fields"] == "%C2%89V%0A-%C3%B2, %F0%9F%98%80"
