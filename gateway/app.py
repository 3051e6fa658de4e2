"""The gateway app: the shared function factory (health, metrics, tracing, docs, problem
details) plus the OpenAI-compatible routes and the original /api/model/process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from litestar import Litestar, Request, Response
from prometheus_client import CollectorRegistry

from functions.app import create_function_app
from functions.errors import problem_response
from functions.settings import FunctionSettings
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.openai import openai_router
from gateway.routes import process
from gateway.service import Gateway


def gateway_problem(request: Request, exc: GatewayError) -> Response:
    """Gateway errors on the non-OpenAI routes: RFC 9457 problem details with their status."""
    return problem_response(exc.status_code, exc.message, instance=request.url.path, headers=exc.headers)


def create_gateway_app(
    cfg: GatewayConfig, settings: FunctionSettings, transport: httpx.AsyncBaseTransport | None = None
) -> Litestar:
    registry = CollectorRegistry()
    gw = Gateway(cfg, registry, transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    process_handler = process
    process_handler.exception_handlers = {GatewayError: gateway_problem}
    return create_function_app(
        service_name="gateway",
        route_handlers=[openai_router, process_handler],
        settings=settings,
        lifespan=[lifespan],
        is_ready=gw.readiness,
        registry=registry,
        openapi_title="tandem gateway",
        state={"gateway": gw},
    )
