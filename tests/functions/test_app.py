"""The shared factory: health, readiness, metrics, docs and problem-details errors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from litestar import get, post
from litestar.params import FromPath, JSONBody
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from functions.app import create_function_app
from functions.errors import JSON, PROBLEM_JSON, BadRequestError
from functions.settings import FunctionSettings, SettingsError


@post("/things/{name:str}", status_code=200, sync_to_thread=False)
def things(name: FromPath[str], data: JSONBody[dict]) -> dict:
    if name == "bad":
        raise BadRequestError("thing 'bad' is not allowed", extra={"thing": name})
    return {"name": name, "keys": sorted(data)}


@get("/boom", sync_to_thread=False)
def boom() -> dict:
    raise RuntimeError("unexpected")


@pytest.fixture
def ready_flag() -> list[bool]:
    return [False]


@pytest.fixture
def client(ready_flag: list[bool]) -> Iterator[TestClient]:
    app = create_function_app(
        service_name="test",
        route_handlers=[things, boom],
        settings=FunctionSettings(port=0, max_body_bytes=1024),
        is_ready=lambda: (ready_flag[0], "weights still loading"),
        registry=CollectorRegistry(),
        openapi_title="test function",
    )
    with TestClient(app) as test_client:
        yield test_client


def assert_problem(response, status: int, path: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(JSON)
    assert response.json()["error"] == response.json()["detail"]
    body = response.json()
    assert body["type"] == "about:blank" and body["status"] == status
    assert body["instance"] == path and body["title"] and body["detail"]
    return body


def test_live_and_ready(client: TestClient, ready_flag: list[bool]) -> None:
    for path in ("/v2/health/live", "/healthz"):
        assert client.get(path).json() == {"live": True}
    for path in ("/v2/health/ready", "/readyz"):
        body = assert_problem(client.get(path), 503, path)
        assert "weights still loading" in body["detail"]
    ready_flag[0] = True
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/readyz").status_code == 200


def test_metrics(client: TestClient) -> None:
    client.post("/things/a", json={})
    client.post("/things/b", json={})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "process_resident_memory_bytes" in text
    assert (
        'tandem_http_requests_total{method="POST",route="/things/{name}",service="test",'
        'status="200"} 2.0' in text
    )
    assert "tandem_http_request_duration_seconds_bucket" in text


def test_registries_are_independent(client: TestClient) -> None:
    create_function_app(  # a second app in the same process must not clash on metric names
        service_name="other",
        route_handlers=[],
        settings=FunctionSettings(port=0),
        is_ready=lambda: (True, ""),
        registry=CollectorRegistry(),
        openapi_title="other",
    )
    assert client.get("/healthz").status_code == 200


def test_docs(client: TestClient) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    schema = client.get("/docs/openapi.json").json()
    assert schema["info"]["title"] == "test function"
    assert "/things/{name}" in schema["paths"]


def test_problem_details(client: TestClient) -> None:
    assert "/nowhere" in assert_problem(client.get("/nowhere"), 404, "/nowhere")["detail"]
    assert_problem(client.delete("/healthz"), 405, "/healthz")
    body = assert_problem(client.post("/things/bad", json={}), 400, "/things/bad")
    assert body["detail"] == "thing 'bad' is not allowed" and body["thing"] == "bad"
    assert_problem(client.post("/things/a", content=b"{not json"), 400, "/things/a")
    assert_problem(client.post("/things/a", json=[1]), 400, "/things/a")


def test_problem_media_type_follows_accept(client: TestClient) -> None:
    """application/json by default (what Open Inference Protocol clients read), RFC 9457's own media
    type for a client that asks for it; the same body either way."""
    plain = client.post("/things/bad", json={})
    asked = client.post("/things/bad", json={}, headers={"Accept": f"{PROBLEM_JSON}, {JSON};q=0.5"})
    assert plain.headers["content-type"].startswith(JSON)
    assert asked.headers["content-type"].startswith(PROBLEM_JSON)
    assert plain.json() == asked.json() and asked.json()["error"] == "thing 'bad' is not allowed"
    not_ready = client.get("/v2/health/ready", headers={"Accept": PROBLEM_JSON})
    assert not_ready.status_code == 503 and not_ready.headers["content-type"].startswith(PROBLEM_JSON)


def test_body_too_large(client: TestClient) -> None:
    body = assert_problem(client.post("/things/a", content=b"x" * 2048), 413, "/things/a")
    assert "TANDEM_MAX_BODY_BYTES" in body["detail"]


def test_unexpected_error_is_500_and_service_continues(client: TestClient) -> None:
    body = assert_problem(client.get("/boom"), 500, "/boom")
    assert "unexpected" not in body["detail"]  # no internals leak to callers
    assert client.post("/things/a", json={"k": 1}).json() == {"name": "a", "keys": ["k"]}


def test_settings_from_env() -> None:
    env = {"PORT": "9000", "TANDEM_MAX_BODY_BYTES": "10", "TANDEM_LOG_LEVEL": "DEBUG"}
    settings = FunctionSettings.from_env(8100, env=env, host="0.0.0.0", port=None)
    assert (settings.port, settings.host, settings.max_body_bytes) == (9000, "0.0.0.0", 10)
    assert settings.log_level == "debug"
    assert FunctionSettings.from_env(8100, env={}).port == 8100
    with pytest.raises(SettingsError, match="TANDEM_MAX_BODY_BYTES"):
        FunctionSettings.from_env(8100, env={"TANDEM_MAX_BODY_BYTES": "lots"})
    with pytest.raises(SettingsError, match="port"):
        FunctionSettings.from_env(8100, env={"PORT": "70000"})


def test_loop_cpu_setting() -> None:
    cpu = min(os.sched_getaffinity(0))
    assert FunctionSettings.from_env(8100, env={"TANDEM_LOOP_CPU": str(cpu)}).loop_cpu == cpu
    assert FunctionSettings.from_env(8100, env={"TANDEM_LOOP_CPU": ""}).loop_cpu is None
    assert FunctionSettings.from_env(8100, env={}).loop_cpu is None
    with pytest.raises(SettingsError, match="TANDEM_LOOP_CPU must be an integer"):
        FunctionSettings.from_env(8100, env={"TANDEM_LOOP_CPU": "first"})
    with pytest.raises(SettingsError, match="TANDEM_LOOP_CPU must be one of this process's CPUs"):
        FunctionSettings.from_env(8100, env={"TANDEM_LOOP_CPU": "4096"})
