"""Fast routes in front of the Litestar app: same contract as a Litestar route (problem JSON,
body limit, metrics labels), everything else still reaches Litestar."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from litestar import Litestar
from prometheus_client import CollectorRegistry

import functions.app as app_module
from functions.app import create_function_app, litestar_app
from functions.errors import JSON, PROBLEM_JSON, BadRequestError
from functions.fastpath import FastRoute, FastRoutesApp
from functions.settings import FunctionSettings, SettingsError

calls: list[str] = []


async def echo(
    match: re.Match[str], headers: dict[str, str], body: bytes
) -> tuple[bytes, dict[str, str], str]:
    name = match["name"]
    calls.append(name)
    if name == "bad":
        raise BadRequestError("thing 'bad' is not allowed", extra={"thing": name})
    if name == "boom":
        raise RuntimeError("secret internals")
    return body[::-1], {"X-Name": name, "X-Seen": headers.get("x-probe", "")}, "application/octet-stream"


ROUTE = FastRoute("POST", re.compile(r"/things/(?P<name>[^/]+)"), "/things/{name}", echo)


def build(registry: CollectorRegistry) -> Any:
    return create_function_app(
        service_name="fast",
        route_handlers=[],
        settings=FunctionSettings(port=0, max_body_bytes=1024),
        is_ready=lambda: (True, ""),
        registry=registry,
        openapi_title="fast",
        fast_routes=[ROUTE],
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(registry: CollectorRegistry):
    calls.clear()
    transport = httpx.ASGITransport(app=build(registry))
    return httpx.AsyncClient(transport=transport, base_url="http://fast")


def problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == JSON
    body = r.json()
    assert body["status"] == status and body["instance"] == r.request.url.path and body["detail"]
    return body


def test_fast_route_answers_and_keeps_the_contract(client: httpx.AsyncClient) -> None:
    metrics = asyncio.run(exercise(client))
    assert calls == ["a", "bad", "bad", "boom", "a"]  # the body limit refused before the handler ran
    for status, n in (("200", 2.0), ("400", 2.0), ("500", 1.0), ("413", 2.0)):
        series = f'tandem_http_requests_total{{method="POST",route="/things/{{name}}",service="fast",status="{status}"}}'
        assert f"{series} {n}" in metrics, (series, metrics)
    assert 'tandem_http_request_duration_seconds_count{route="/things/{name}",service="fast"} 7.0' in metrics


async def exercise(client: httpx.AsyncClient) -> str:
    async with client:
        r = await client.post("/things/a", content=b"abc", headers={"X-Probe": "p"})
        assert (r.status_code, r.content, r.headers["x-name"], r.headers["x-seen"]) == (200, b"cba", "a", "p")
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-length"] == "3"
        body = problem(await client.post("/things/bad", content=b"x"), 400)
        assert body["detail"] == "thing 'bad' is not allowed" and body["thing"] == "bad"
        asked = await client.post("/things/bad", content=b"x", headers={"Accept": PROBLEM_JSON})
        assert asked.headers["content-type"] == PROBLEM_JSON and asked.json() == body
        body = problem(await client.post("/things/boom", content=b"x"), 500)
        assert "secret" not in body["detail"]
        assert (
            "TANDEM_MAX_BODY_BYTES"
            in problem(await client.post("/things/a", content=b"x" * 2048), 413)["detail"]
        )

        async def chunks():  # no Content-Length: the limit must hold while reading
            for _ in range(4):
                yield b"y" * 400

        problem(await client.post("/things/a", content=chunks()), 413)
        assert (await client.post("/things/a", content=b"still")).content == b"llits"
        # other methods and paths are Litestar's (which has no /things route here)
        assert "no route matches GET" in problem(await client.get("/things/a"), 404)["detail"]
        problem(await client.post("/things/a/more", content=b""), 404)
        assert (await client.get("/healthz")).json() == {"live": True}
        return (await client.get("/metrics")).text


def test_a_client_gone_before_its_body_gets_no_answer(registry) -> None:
    calls.clear()
    app = build(registry)
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/things/a", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    assert sent == [] and calls == []
    assert (
        registry.get_sample_value(
            "tandem_http_requests_total",
            {"method": "POST", "route": "/things/{name}", "service": "fast", "status": "499"},
        )
        == 1.0
    )


def test_tracing_takes_the_litestar_route(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    # with an OTLP endpoint the OpenTelemetry middleware must see every request: no fast entry
    monkeypatch.setattr(app_module, "configure_tracing", lambda _name: True)
    assert isinstance(build(registry), Litestar)


def test_no_fast_routes_serves_the_app_itself(registry) -> None:
    app = create_function_app(
        service_name="plain",
        route_handlers=[],
        settings=FunctionSettings(port=0),
        is_ready=lambda: (True, ""),
        registry=registry,
        openapi_title="plain",
    )
    assert isinstance(app, Litestar) and litestar_app(app) is app
    fast = build(CollectorRegistry())
    assert isinstance(fast, FastRoutesApp)  # tracing off: the fast routes stand in front
    assert isinstance(litestar_app(fast), Litestar)


def test_fast_path_can_be_forced_either_way(registry) -> None:
    def make(fast_path: bool | None, setting: str = "auto") -> object:
        return create_function_app(
            service_name="forced",
            route_handlers=[],
            settings=FunctionSettings(port=0, fast_path=setting),
            is_ready=lambda: (True, ""),
            registry=CollectorRegistry(),
            openapi_title="forced",
            fast_routes=[ROUTE],
            fast_path=fast_path,
        )

    assert isinstance(make(False), Litestar)
    assert isinstance(make(True), FastRoutesApp)
    # TANDEM_FAST_PATH (the setting) decides when the caller does not
    assert isinstance(make(None, "off"), Litestar)
    assert isinstance(make(None, "on"), FastRoutesApp)
    assert isinstance(make(None, "auto"), FastRoutesApp)  # tracing is off in tests
    assert FunctionSettings.from_env(0, {"TANDEM_FAST_PATH": "off"}).fast_path == "off"
    with pytest.raises(SettingsError, match="TANDEM_FAST_PATH must be one of auto, on, off, got 'maybe'"):
        FunctionSettings.from_env(0, {"TANDEM_FAST_PATH": "maybe"})
