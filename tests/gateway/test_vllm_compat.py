"""What benchmark tools and SDK wrappers built for vLLM call besides completions, in-process:
/health, /version, /tokenize, /detokenize, `stream_options.continuous_usage_stats`, unknown request
fields (ignored and named in a header, or refused in strict mode), known-but-unsupported fields and
loosely typed values (400 naming the field)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.openai import IGNORED_HEADER
from tests.helpers.inproc import InProcessStack, in_process_stack
from tests.helpers.procs import REPO_ROOT, eventually

TEXT = "Hello, my name is"


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle) as s:
        yield s


def call(stack: InProcessStack, method: str, path: str, **kw: Any) -> httpx.Response:
    return stack.call(method, path, **kw)


def openai_error(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    for w in words:
        assert w in err["message"], err
    return err


def test_health_and_version(stack: InProcessStack) -> None:
    r = call(stack, "GET", "/health")
    assert r.status_code == 200 and r.content == b""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert call(stack, "GET", "/version").json() == {"version": pyproject["project"]["version"]}


def test_health_is_503_while_a_stage_has_no_ready_replica(stack: InProcessStack) -> None:
    # the stage's only replica really stops answering (marking it down by hand races the health
    # loop, which marks it up again at its next check while the replica still answers)
    pool = stack.gateway.replicas.pools[1]
    hosts = {stack.hosts[rep.node.id] for rep in pool.replicas}
    stack.router.down |= hosts
    try:
        eventually(lambda: not pool.up(), 10, "the health loop sees the replica go down")
        r = call(stack, "GET", "/health")
        assert openai_error(r, 503, "not ready")
    finally:
        stack.router.down -= hosts
    eventually(lambda: bool(pool.up()), 10, "the health loop sees the replica come back")
    assert call(stack, "GET", "/health").status_code == 200


def test_tokenize_and_detokenize_round_trip(stack: InProcessStack) -> None:
    gw = stack.gateway
    assert gw.tokenizer is not None and gw.layout is not None
    r = call(stack, "POST", "/tokenize", json={"prompt": TEXT, "model": "gpt2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == gw.tokenizer.encode(TEXT)
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == gw.layout.max_positions
    r = call(stack, "POST", "/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": gw.tokenizer.decode(body["tokens"])}


def test_tokenize_refusals_are_openai_errors(stack: InProcessStack) -> None:
    vocab = stack.gateway.layout.vocab_size  # type: ignore[union-attr]
    openai_error(call(stack, "POST", "/detokenize", json={"tokens": [1, vocab]}), 400, str(vocab))
    openai_error(call(stack, "POST", "/tokenize", json={"prompt": TEXT, "model": "other"}), 404, "other")
    openai_error(call(stack, "POST", "/tokenize", json={"prompt": 5}), 400, "prompt")
    openai_error(call(stack, "POST", "/tokenize", json={"prompt": TEXT, "messages": []}), 400, "messages")


def sse_chunks(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    lines = [ln[len("data: ") :] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_continuous_usage_stats_puts_usage_in_every_chunk(stack: InProcessStack) -> None:
    body = {"prompt": TEXT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse_chunks(call(stack, "POST", "/v1/completions", json=body))
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    assert prompt_tokens > 0 and chunks[-1]["choices"] == []
    seen = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == prompt_tokens for c in chunks)
    assert seen == sorted(seen) and seen[-1] == 6 and seen[0] >= 1
    assert all(c["usage"]["total_tokens"] == prompt_tokens + n for c, n in zip(chunks, seen, strict=True))
    # without it, only the last chunk carries usage (OpenAI's include_usage)
    body["stream_options"] = {"include_usage": True}
    chunks = sse_chunks(call(stack, "POST", "/v1/completions", json=body))
    assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


def test_unknown_fields_are_ignored_and_named(stack: InProcessStack) -> None:
    body = {"prompt": TEXT, "max_tokens": 2, "min_p": 0.1, "guided_json": {}}
    r = call(stack, "POST", "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers[IGNORED_HEADER] == "guided_json, min_p"
    r = call(stack, "POST", "/v1/completions", json={"prompt": TEXT, "max_tokens": 2})
    assert r.status_code == 200 and IGNORED_HEADER not in r.headers


def test_ignored_field_names_are_percent_encoded_in_the_header(stack: InProcessStack) -> None:
    # found by tests/fuzz: a name with a newline went into the header as is, and the server dropped
    # the connection without an answer; a very long name made a header of any size
    body = {"prompt": TEXT, "max_tokens": 1, "a\nb, c": 1, "é": 2}
    r = call(stack, "POST", "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers[IGNORED_HEADER] == "a%0Ab%2C%20c, %C3%A9", r.text
    r = call(stack, "POST", "/v1/completions", json={**body, "x" * 5000: 3})
    value = r.headers[IGNORED_HEADER]
    assert value.startswith("a%0Ab%2C%20c, xxx") and value.endswith(", ...") and len(value) == 1024


def test_strict_mode_refuses_unknown_fields(stack: InProcessStack) -> None:
    gw = stack.gateway
    cfg = gw.cfg
    gw.cfg = dataclasses.replace(cfg, strict_fields=True)
    try:
        r = call(stack, "POST", "/v1/completions", json={"prompt": TEXT, "max_tokens": 2, "min_p": 0.1})
        assert openai_error(r, 400, "min_p", "strict")["param"] == "min_p"
    finally:
        gw.cfg = cfg


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"logit_bias": {"fifty": 5}}, "logit_bias"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"stream": 1}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream_options": {"include_usage": True, "extra": 1}}, "extra"),
    ],
)
def test_unsupported_and_loosely_typed_fields_are_400(
    stack: InProcessStack, extra: dict[str, Any], param: str
) -> None:
    r = call(stack, "POST", "/v1/completions", json={"prompt": TEXT, "max_tokens": 2, **extra})
    openai_error(r, 400, param)
