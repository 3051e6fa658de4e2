"""The gateway app: the shared function factory (health, metrics, tracing, docs) plus the
OpenAI-compatible routes, vLLM's serving extras and the original /api/model/process, with one error
handler: every error becomes a GatewayError, is counted, and is answered in OpenAI's shape under /v1/
and on vLLM's routes, and as RFC 9457 problem details elsewhere
(functions/errors.py says how their media type is chosen).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from litestar import Litestar, Request, Response
from prometheus_client import CollectorRegistry

from functions.app import create_function_app
from functions.errors import problem_media, problem_response
from functions.fastpath import ASGIApp
from functions.settings import FunctionSettings
from functions.telemetry import tracing_enabled
from gateway.clients import StagePoster
from gateway.config import GatewayConfig
from gateway.cors import cors_config
from gateway.discovery import ChatOverride
from gateway.errors import as_gateway_error
from gateway.nodes import nodes
from gateway.openai import openai_error_body, openai_routes
from gateway.routes import process
from gateway.service import Gateway
from gateway.tracing import TraceIdMiddleware
from gateway.vllm_extras import OPENAI_SHAPED, vllm_routes

API_PREFIXES = ("/v1/", "/api/")  # routes counted in tandem_requests_total


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The gateway's one exception handler (registered for Exception)."""
    path = request.url.path
    err = as_gateway_error(exc, request.method, path)
    if path.startswith(API_PREFIXES):
        gw: Gateway = request.app.state.gateway
        gw.metrics.record_request(request.scope.get("path_template") or "unmatched", err.status_code)
    if path.startswith("/v1/") or path in OPENAI_SHAPED:
        return Response(openai_error_body(err), status_code=err.status_code, headers=err.headers)
    return problem_response(
        err.status_code,
        err.message,
        instance=path,
        title=err.title,
        extra=err.extra,
        headers=err.headers,
        media_type=problem_media(request.headers.get("accept")),
    )


def create_gateway_app(
    cfg: GatewayConfig,
    settings: FunctionSettings,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    poster: StagePoster | None = None,
    cors_origins: Sequence[str] = (),
    id_tokens: httpx.Auth | None = None,
    chat_template: ChatOverride | None = None,
) -> ASGIApp:
    """The gateway's ASGI app. `transport` carries every call to the functions when given (tests
    pass ASGI apps in-process); `poster` replaces only the stage infer calls; `cors_origins` are the
    browser origins allowed to call it (gateway.cors); `id_tokens` authenticates its calls to
    Cloud Run functions (gateway.id_tokens); `chat_template` replaces the model's."""
    registry = CollectorRegistry()
    gw = Gateway(
        cfg,
        registry,
        transport,
        poster,
        auth_token=settings.auth_token,
        id_tokens=id_tokens,
        chat_override=chat_template,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = create_function_app(
        service_name="gateway",
        route_handlers=[*openai_routes, *vllm_routes, process, nodes],
        settings=settings,
        lifespan=[lifespan],
        is_ready=gw.readiness,
        registry=registry,
        openapi_title="tandem gateway",
        state={"gateway": gw},
        exception_handler=handle_error,
        api_keys=True,
        cors=cors_config(cors_origins),
        middleware=[TraceIdMiddleware],
    )
    gw.tracing = tracing_enabled()  # the factory has configured it
    return app
