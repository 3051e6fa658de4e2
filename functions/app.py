"""The one Litestar app factory shared by every function: health, readiness, metrics, tracing,
OpenAPI docs and problem-details errors around the caller's own route handlers. It returns the ASGI
callable to serve (the fast routes in front of Litestar when there are any); running it in a
process (uvicorn, signals, CPU pinning) is `functions.process`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.static_files import create_static_files_router
from openapi_ui_bundles import swagger_ui
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from functions import stage_api as api
from functions.auth import CHALLENGE, Authenticator, host_refusal
from functions.errors import problem_details_handler, problem_media, problem_response
from functions.fastpath import ASGIApp, FastRoute, FastRoutesApp, Message, Receive, Scope, Send
from functions.settings import FunctionSettings
from functions.telemetry import configure_tracing

__all__ = ["LATENCY_BUCKETS", "create_function_app", "litestar_app"]

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
    fast_path: bool | None = None,
    cors: CORSConfig | None = None,
    exception_handler: Callable[[Request[Any, Any, Any], Exception], Response[Any]] = problem_details_handler,
    api_keys: bool = False,
    middleware: Sequence[Any] = (),
) -> ASGIApp:
    """Build a function's app and return the ASGI callable to serve; `registry` must be fresh per
    app (never the global default). `fast_routes` are served in front of Litestar
    (functions.fastpath) when `fast_path` is True; when None, as `settings.fast_path` says ("auto":
    unless tracing is on, since the Litestar routes add the server spans). Callers authenticate
    as `authenticator` says; `middleware` wraps the Litestar routes inside the metrics one."""
    logging.getLogger("tandem").setLevel(settings.log_level.upper())
    auth = authenticator(settings, api_keys)
    tracing = configure_tracing(service_name)
    requests, duration = http_metrics(registry)
    asgi: Any = HttpMetricsMiddleware  # plain ASGI (functions.fastpath types), not Litestar's
    metrics = DefineMiddleware(asgi, service=service_name, requests=requests, duration=duration)
    app = Litestar(
        route_handlers=[*common_routes(service_name, is_ready, registry), docs_assets(), *route_handlers],
        lifespan=list(lifespan or []),
        middleware=[metrics, *middleware],
        # Without an OTLP endpoint the plugin would only make non-recording spans: on a stage's hot
        # path that is measurable overhead for nothing.
        plugins=[OpenTelemetryPlugin(otel_config())] if tracing else [],
        openapi_config=openapi_config(openapi_title),
        exception_handlers={Exception: exception_handler},
        before_request=before_request(auth, settings),
        request_max_body_size=settings.max_body_bytes,
        cors_config=cors,
        state=State(state or {}),
        # Logging belongs to the process (see `serve`), not to each app built in a test.
        logging_config=None,
    )
    if fast_path is None:
        fast_path = {"on": True, "off": False}.get(settings.fast_path, not tracing)
    if not fast_routes or not fast_path:
        return app
    return FastRoutesApp(
        app,
        fast_routes,
        service=service_name,
        requests=requests,
        duration=duration,
        max_body_bytes=settings.max_body_bytes,
        auth=auth,
        allowed_hosts=settings.allowed_hosts,
    )


def authenticator(settings: FunctionSettings, api_keys: bool) -> Authenticator | None:
    """Who may call: the client API keys (the gateway), else the service token; None: anyone."""
    if api_keys:
        return Authenticator.of(settings.api_keys, "an API key of this gateway")
    return Authenticator.of([settings.auth_token or ""], "the service token (TANDEM_AUTH_TOKEN)")


def before_request(
    auth: Authenticator | None, settings: FunctionSettings
) -> Callable[[Request[Any, Any, Any]], None]:
    """The hook every Litestar route runs first."""

    def before(request: Request[Any, Any, Any]) -> None:
        """Authentication first, then: a route that reads a JSON body takes only JSON (no header
        at all is read as JSON too, for hand-written clients)."""
        why = auth.refusal(request.url.path, request.headers.get("authorization")) if auth else None
        if why is not None:
            raise NotAuthorizedException(detail=why, headers=CHALLENGE)
        wrong_host = host_refusal(request.url.path, request.headers.get("host"), settings.allowed_hosts)
        if wrong_host is not None:
            raise HTTPException(status_code=400, detail=wrong_host)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and "data" in request.route_handler.parsed_fn_signature.parameters and not is_json(media):
            raise HTTPException(
                status_code=415,
                detail=f"{request.method} {request.url.path} takes a JSON body "
                f"(Content-Type: application/json), not {media}",
            )

    return before


def http_metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    """The HTTP series every function has (the fast path counts into the same ones)."""
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
    return requests, duration


def common_routes(
    service_name: str, is_ready: Callable[[], tuple[bool, str]], registry: CollectorRegistry
) -> list[Any]:
    """Liveness, readiness and metrics."""

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
        return problem_response(
            503,
            f"{service_name} is not ready: {reason}",
            instance=request.url.path,
            media_type=problem_media(request.headers.get("accept")),
        )

    @get("/metrics", include_in_schema=False, sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(generate_latest(registry), media_type=METRICS_MEDIA_TYPE)

    return [live, ready, metrics]


def otel_config() -> OpenTelemetryConfig:
    return OpenTelemetryConfig(
        # control-plane calls (releases, discovery) would each open a trace of their own
        exclude=[
            "^/metrics$",
            "^/v2/health/",
            "^/healthz$",
            "^/readyz$",
            api.SEQUENCES_PART,
            "^/v1/tokenizer$",
            "^/api/nodes$",  # the UI polls it every 2 s
        ],
        exclude_spans=["receive", "send"],
    )


def openapi_config(title: str) -> OpenAPIConfig:
    """OpenAPI at /docs, with Swagger UI's files served here (docs_assets)."""
    return OpenAPIConfig(
        title=title,
        version="0.1.0",
        path="/docs",
        render_plugins=[
            SwaggerRenderPlugin(
                js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
                favicon=f"<link rel='icon' type='image/png' href='{DOCS_ASSETS}/favicon-32x32.png'>",
            )
        ],
    )


DOCS_ASSETS = "/docs/assets"


def docs_assets() -> Any:
    """Swagger UI's files (the openapi-ui-bundles package), served here: /docs loads nothing from
    another origin (no CDN to trust, and it works offline)."""
    return create_static_files_router(
        path=DOCS_ASSETS, directories=[swagger_ui.static_path], include_in_schema=False, name="docs-assets"
    )


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def litestar_app(entry: ASGIApp) -> Litestar:
    """The Litestar app behind what `create_function_app` returned (its state, its routes)."""
    app = entry.app if isinstance(entry, FastRoutesApp) else entry
    if not isinstance(app, Litestar):
        raise TypeError(f"not a function app: {entry!r}")
    return app
