"""TANDEM_ALLOWED_HOSTS: a request whose Host is not a configured name is a 400 that says why, on
Litestar's routes and on the fast path alike; health, metrics and docs answer any host."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from litestar import post
from litestar.params import JSONBody
from prometheus_client import CollectorRegistry

from functions.app import create_function_app
from functions.auth import host_refusal
from functions.fastpath import FastRoute
from functions.settings import FunctionSettings

ALLOWED = ("127.0.0.1", "localhost", "::1", "*.svc.cluster.local")


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("LOCALHOST:5173", True),
        ("[::1]:8000", True),
        ("stage-1.model-inference.svc.cluster.local:8080", True),
        ("evil.example:8000", False),
        ("127.0.0.1.evil.example", False),
        ("svc.cluster.local.evil", False),
        ("", False),
        (None, False),
    ],
)
def test_host_names(host: str | None, ok: bool) -> None:
    assert (host_refusal("/v1/completions", host, ALLOWED) is None) is ok
    assert host_refusal("/v1/completions", host, ()) is None  # nothing configured: any host
    assert host_refusal("/v2/health/ready", host, ALLOWED) is None  # probes address pods by IP


@post("/things", status_code=200, sync_to_thread=False)
def things(data: JSONBody[dict]) -> dict:
    return {"keys": sorted(data)}


async def echo(match: object, headers: dict[str, str], body: bytes) -> tuple[bytes, dict[str, str], str]:
    return body, {}, "application/octet-stream"


def test_wrong_host_is_a_400_on_both_paths() -> None:
    import re

    app = create_function_app(
        service_name="hosts",
        route_handlers=[things],
        settings=FunctionSettings(port=0, allowed_hosts=ALLOWED),
        is_ready=lambda: (True, ""),
        registry=CollectorRegistry(),
        openapi_title="hosts",
        fast_routes=[FastRoute("POST", re.compile("/fast"), "/fast", echo)],
        fast_path=True,
    )

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://evil.example"
        ) as c:
            return [
                await c.post("/things", json={"a": 1}),
                await c.post("/fast", content=b"x"),
                await c.get("/v2/health/live"),
                await c.post("/things", json={"a": 1}, headers={"Host": "localhost:8000"}),
                await c.post("/fast", content=b"x", headers={"Host": "127.0.0.1:8000"}),
            ]

    slow, fast, health, ok_slow, ok_fast = asyncio.run(go())
    for r in (slow, fast):
        assert r.status_code == 400 and "TANDEM_ALLOWED_HOSTS" in r.json()["detail"], r.text
        assert "evil.example" in r.json()["detail"]
    assert health.status_code == 200
    assert ok_slow.status_code == 200 and ok_slow.json() == {"keys": ["a"]}
    assert ok_fast.status_code == 200 and ok_fast.content == b"x"
