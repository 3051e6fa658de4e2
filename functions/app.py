"""The one Litestar app factory shared by every function: health, readiness, metrics, tracing,
OpenAPI docs and problem-details errors around the caller's own route handlers; and `serve`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from functions.errors import problem_details_handler, problem_response
from functions.fastpath import FastRoute, FastRoutesApp
from functions.settings import FunctionSettings
from functions.telemetry import configure_tracing

__all__ = ["LATENCY_BUCKETS", "asgi_entry", "create_function_app", "serve", "unpin_this_thread"]

FAST_ENTRY = "fast_entry"  # app.state key of the FastRoutesApp in front of the app, when there is one

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready", "/healthz", "/readyz")
# Sub-millisecond to seconds: a decode step is ~1 ms, a big prefill a few seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Litestar appends the charset itself; leaving prometheus_client's in would repeat it.
METRICS_MEDIA_TYPE = "; ".join(
    part.strip() for part in CONTENT_TYPE_LATEST.split(";") if "charset" not in part
)

logger = logging.getLogger("tandem.functions")


class HttpMetricsMiddleware:
    """Counts requests and times them, labelled by route template to keep cardinality bounded."""

    def __init__(self, app: ASGIApp, *, service: str, requests: Counter, duration: Histogram):
        self.app, self.service, self.requests, self.duration = app, service, requests, duration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # stays 500 if the app raises before starting a response

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path_template") or "unmatched"
            self.duration.labels(self.service, route).observe(time.perf_counter() - start)
            method = scope.get("method", "")
            self.requests.labels(self.service, route, method, str(status)).inc()


def create_function_app(
    *,
    service_name: str,
    route_handlers: Sequence[Any],
    settings: FunctionSettings,
    lifespan: Sequence[Any] | None = None,
    is_ready: Callable[[], tuple[bool, str]],
    registry: CollectorRegistry,
    openapi_title: str,
    state: dict[str, Any] | None = None,
    fast_routes: Sequence[FastRoute] = (),
) -> Litestar:
    """Build a function's app; `registry` must be fresh per app (never the global default).

    `fast_routes` are served in front of the app (see functions.fastpath) unless tracing is on;
    `asgi_entry(app)` is what a server must run to get them.
    """
    logging.getLogger("tandem").setLevel(settings.log_level.upper())
    tracing = configure_tracing(service_name)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    requests = Counter(
        "tandem_http_requests_total",
        "HTTP requests answered, by route template and status.",
        ["service", "route", "method", "status"],
        registry=registry,
    )
    duration = Histogram(
        "tandem_http_request_duration_seconds",
        "HTTP request duration, by route template.",
        ["service", "route"],
        registry=registry,
        buckets=LATENCY_BUCKETS,
    )

    @get(["/v2/health/live", "/healthz"], tags=["health"], sync_to_thread=False)
    def live() -> dict[str, bool]:
        """Liveness: the process answers HTTP."""
        return {"live": True}

    @get(["/v2/health/ready", "/readyz"], tags=["health"], sync_to_thread=False)
    def ready(request: Request[Any, Any, Any]) -> Response[Any]:
        """Readiness: 200 `{"ready": true}` once the function can serve, else 503 and why."""
        ok, reason = is_ready()
        if ok:
            return Response({"ready": True})
        return problem_response(503, f"{service_name} is not ready: {reason}", instance=request.url.path)

    @get("/metrics", include_in_schema=False, sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(generate_latest(registry), media_type=METRICS_MEDIA_TYPE)

    otel = OpenTelemetryConfig(
        # control-plane calls (releases, discovery) would each open a trace of their own
        exclude=["^/metrics$", "^/v2/health/", "^/healthz$", "^/readyz$", "/sequences", "^/v1/tokenizer$"],
        exclude_spans=["receive", "send"],
    )
    app = Litestar(
        route_handlers=[live, ready, metrics, *route_handlers],
        lifespan=list(lifespan or []),
        middleware=[
            DefineMiddleware(
                HttpMetricsMiddleware, service=service_name, requests=requests, duration=duration
            )
        ],
        # Without an OTLP endpoint the plugin would only make non-recording spans: on a stage's hot
        # path that is measurable overhead for nothing.
        plugins=[OpenTelemetryPlugin(otel)] if tracing else [],
        openapi_config=OpenAPIConfig(
            title=openapi_title,
            version="0.1.0",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        exception_handlers={Exception: problem_details_handler},
        request_max_body_size=settings.max_body_bytes,
        state=State(state or {}),
        # Logging belongs to the process (see `serve`), not to each app built in a test.
        logging_config=None,
    )
    if fast_routes and not tracing:
        app.state[FAST_ENTRY] = FastRoutesApp(
            app,
            fast_routes,
            service=service_name,
            requests=requests,
            duration=duration,
            max_body_bytes=settings.max_body_bytes,
        )
    return app


def asgi_entry(app: Litestar) -> ASGIApp:
    """The ASGI callable to serve: the fast routes in front of `app` when it has any, else `app`."""
    return app.state.get(FAST_ENTRY) or app


def serve(app: Litestar, settings: FunctionSettings) -> int:
    """Run `app` under uvicorn until SIGINT/SIGTERM, then drain gracefully; returns exit code 0."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per stage call is noise
    config = uvicorn.Config(
        asgi_entry(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=10,
        access_log=False,
    )
    if settings.loop_cpu is not None:
        pin_serving_thread(settings.loop_cpu)
    # uvicorn re-raises the stop signal after its graceful shutdown, which would end the process
    # with -15 instead of 0; a handler installed before it is restored and receives that signal.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    uvicorn.Server(config).run()
    if received:
        logger.info("stopped by signal %s after a graceful shutdown", received[0])
    return 0


# The CPUs the process had before `serve` pinned its serving thread; None while nothing is pinned.
_process_cpus: set[int] | None = None


def pin_serving_thread(cpu: int) -> None:
    """Keep the calling thread (the event loop) on `cpu`; threads it starts later inherit that, so
    a thread that computes (ONNX Runtime's pool is created by the stage's loader thread) calls
    `unpin_this_thread` first.

    Why: on the 2-core machine the whole stack shares, one token crosses five processes. With every
    event loop on one core, handing a request from one process to the next is a wake-up on the same
    core instead of an interrupt to the other, and ONNX Runtime's worker threads have the other core
    to themselves: the stack's single-stream rate went from 0.79x to 0.83-0.85x the monolith's
    (paired benchmark runs, README "Benchmarks").
    """
    global _process_cpus
    if _process_cpus is None:
        _process_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    logger.info("serving thread pinned to CPU %d (TANDEM_LOOP_CPU)", cpu)


def unpin_this_thread() -> None:
    """Give the calling thread back every CPU the process had (no-op when nothing was pinned)."""
    if _process_cpus is not None:
        os.sched_setaffinity(0, _process_cpus)
