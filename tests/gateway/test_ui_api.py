"""What the web UI needs from the gateway, against a real stack: GET /api/nodes (replicas up and
down with the reason, KV cache use while a stream runs and after it ends, the OpenAPI schema), the
time per stage on a stream's usage chunk, and CORS: which origins the browser may call from."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.settings import SettingsError
from gateway.cors import cors_origins
from tests.helpers.procs import stop_process
from tests.helpers.stack import Stack, start_stack

pytestmark = pytest.mark.slow

UI = "http://127.0.0.1:5173"
OTHER = "http://evil.example"


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"TANDEM_CORS_ORIGINS": f"{UI}, http://localhost:5173"}
    s = start_stack(tiny_bundle, tmp_path_factory.mktemp("nodes"), replicas=(1, 2, 1), gateway_env=env)
    yield s
    s.stop()


def nodes(stack: Stack) -> dict[str, Any]:
    r = httpx.get(f"{stack.gateway_url}/api/nodes", timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def kv_sequences(body: dict[str, Any]) -> dict[str, int]:
    return {rep["id"]: rep["kv"]["sequences"] for st in body["stages"] for rep in st["replicas"]}


def test_every_stage_and_replica_listed_up_with_kv_figures(stack: Stack) -> None:
    body = nodes(stack)
    assert body["ready"] is True and body["model"] == "gpt2"
    assert body["tokenizer"] == {"up": True, "reason": "ready"}
    assert body["tracing"] is False  # no OTEL_* endpoint here: the UI shows no trace link
    assert [st["name"] for st in body["stages"]] == list(stack.stage_urls)
    for st in body["stages"]:
        urls = stack.stage_urls[st["name"]]
        assert [f"http://{rep['address']}" for rep in st["replicas"]] == urls
        for rep in st["replicas"]:
            assert rep["up"] is True and rep["reason"] == "ready"
            assert rep["kv_error"] is None
            assert rep["kv"]["sequences"] == 0 and rep["kv"]["bytes"] == 0
            assert rep["kv"]["capacity_bytes"] > 0


def test_kv_use_shows_a_running_stream_and_its_release(stack: Stack) -> None:
    body = {"prompt": "Hello the model", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generation under way
        during = nodes(stack)
    held = kv_sequences(during)
    per_stage = [sum(held[rep["id"]] for rep in st["replicas"]) for st in during["stages"]]
    assert per_stage == [1, 1, 1], held  # each stage holds the one sequence on one replica
    assert all(rep["kv"]["bytes"] > 0 for st in during["stages"] for rep in st["replicas"] if held[rep["id"]])
    deadline = time.monotonic() + 10  # the disconnect frees it in every stage
    while any(kv_sequences(nodes(stack)).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(kv_sequences(nodes(stack)).values())


def test_stream_usage_chunk_carries_time_per_stage(stack: Stack) -> None:
    body = {"prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    stage_ms = last["metrics"]["stage_ms"]
    assert list(stage_ms) == list(stack.stage_urls) and all(ms > 0 for ms in stage_ms.values())
    assert all("metrics" not in c for c in chunks[:-1])


def test_openapi_documents_the_route(stack: Stack) -> None:
    schema = httpx.get(f"{stack.gateway_url}/docs/openapi.json", timeout=5).json()
    op = schema["paths"]["/api/nodes"]["get"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[1]
    props = schema["components"]["schemas"][name]["properties"]
    assert {"model", "ready", "reason", "tokenizer", "stages"} <= set(props)
    assert "stages" in json.dumps(op) or props["stages"]["type"] == "array"


def test_cors_allows_only_configured_origins(stack: Stack) -> None:
    url = f"{stack.gateway_url}/v1/completions"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(url, headers={"Origin": UI, **pre}, timeout=5)
    assert ok.status_code in (200, 204) and ok.headers["access-control-allow-origin"] == UI
    assert "POST" in ok.headers["access-control-allow-methods"]
    refused = httpx.options(url, headers={"Origin": OTHER, **pre}, timeout=5)
    assert refused.status_code >= 400 and "access-control-allow-origin" not in refused.headers
    body = {"prompt": "Hello", "max_tokens": 2}
    r = httpx.post(url, json=body, headers={"Origin": "http://localhost:5173"}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-trace-id", "retry-after"} <= exposed
    r = httpx.get(f"{stack.gateway_url}/api/nodes", headers={"Origin": OTHER}, timeout=5)
    assert "access-control-allow-origin" not in r.headers


def test_replica_down_is_listed_with_its_reason(stack: Stack) -> None:
    """Runs last in this module: it stops a replica of stage-2 (the other one keeps serving)."""
    victim = nodes(stack)["stages"][1]["replicas"][1]
    stop_process(stack.procs.pop(victim["id"]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rep = nodes(stack)["stages"][1]["replicas"][1]
        if not rep["up"]:
            break
        time.sleep(0.1)
    assert rep["id"] == victim["id"] and rep["up"] is False
    assert "unreachable" in rep["reason"]
    assert rep["kv"] is None and "unreachable" in rep["kv_error"]
    assert nodes(stack)["ready"] is True  # the other replica still serves stage-2


def test_no_cors_headers_without_configured_origins(stack: Stack) -> None:
    url = stack.start_gateway("plain", stack.config(), env={"TANDEM_CORS_ORIGINS": ""})
    r = httpx.get(f"{url}/api/nodes", headers={"Origin": UI}, timeout=5)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origins_setting() -> None:
    assert cors_origins({}) == []
    assert cors_origins({"TANDEM_CORS_ORIGINS": " http://a:1 ,https://b , "}) == ["http://a:1", "https://b"]
    for bad in ("localhost:5173", "ftp://x", "http://x/path", "http://"):
        with pytest.raises(SettingsError, match="TANDEM_CORS_ORIGINS"):
            cors_origins({"TANDEM_CORS_ORIGINS": bad})
