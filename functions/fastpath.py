"""Hot routes served in front of Litestar, straight on ASGI.

A decode step is a few milliseconds of ONNX Runtime per stage, and the gateway makes one call per
stage per generated token. Litestar's routing, dependency injection, middleware and response
objects cost about half a millisecond per request on the 2-core machine we measure on (py-spy, see
docs/benchmarks.md), which adds up to over a millisecond and a half per token across three stages.
A `FastRoute` answers one method and path pattern with a plain coroutine instead; everything else
(health, metadata, docs, errors of other routes) still goes through the Litestar app unchanged.

The fast path keeps the same contract: RFC 9457 problem JSON for the functions' own errors, the
body size limit, a generic 500 (traceback in the log) for anything unexpected, and the same
`tandem_http_requests_total` / `tandem_http_request_duration_seconds` series, labelled with the
route template Litestar would use. It is only installed when tracing is off: with an OTLP endpoint
set, requests take the Litestar route and its OpenTelemetry middleware (server spans, W3C context).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from functions.auth import CHALLENGE, Authenticator, host_refusal
from functions.errors import (
    BadRequestError,
    PayloadTooLargeError,
    UnauthorizedError,
    known_problem,
    problem_media,
    unexpected_problem,
)

__all__ = ["ASGIApp", "FastHandler", "FastRoute", "FastRoutesApp"]

# Plain ASGI, loosely typed: these modules speak the raw protocol (Litestar's TypedDicts would
# make every message a union to narrow).
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # what a server runs: a Litestar app or a wrapper of one

# (path match, lower-cased request headers, body) -> (response body, extra response headers, media type)
FastHandler = Callable[[re.Match[str], dict[str, str], bytes], Awaitable[tuple[bytes, dict[str, str], str]]]


@dataclass(frozen=True)
class FastRoute:
    method: str
    pattern: re.Pattern[str]  # matched against the whole path
    template: str  # the metrics label: the template Litestar gives the same route
    handler: FastHandler


class _Disconnected(Exception):
    pass


class FastRoutesApp:
    """ASGI app: `routes` answered directly, every other request passed to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[FastRoute],
        *,
        service: str,
        requests: Counter,
        duration: Histogram,
        max_body_bytes: int,
        auth: Authenticator | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ):
        self.allowed_hosts = allowed_hosts
        self.app, self.routes, self.service, self.auth = app, tuple(routes), service, auth
        self.requests, self.duration, self.max_body_bytes = requests, duration, max_body_bytes
        # metric children resolved once per route (and status), not per request
        self._durations = {r.template: duration.labels(service, r.template) for r in self.routes}
        self._counts: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                if scope["method"] == route.method:
                    match = route.pattern.fullmatch(scope["path"])
                    if match is not None:
                        await self._serve(route, match, scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: FastRoute, match: re.Match[str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if self.auth is not None and (why := self.auth.refusal(path, headers.get("authorization"))):
                raise UnauthorizedError(why)
            if wrong_host := host_refusal(path, headers.get("host"), self.allowed_hosts):
                raise BadRequestError(wrong_host)
            body = await self._read_body(headers, receive)
            out, extra, media = await route.handler(match, headers, body)
            status = 200
        except _Disconnected:
            status = 499  # nobody to answer; counted like nginx does
        except Exception as e:  # noqa: BLE001 - every error becomes a response, never a crash
            known = known_problem(e, path)
            status, out = known if known is not None else (500, unexpected_problem(scope["method"], path))
            media, extra = problem_media(headers.get("accept")), dict(CHALLENGE) if status == 401 else {}
        if status != 499:
            raw = [(b"content-type", media.encode()), (b"content-length", str(len(out)).encode())]
            raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": out})
        self._durations[route.template].observe(time.perf_counter() - start)
        key = (route.template, route.method, status)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.requests.labels(
                self.service, route.template, route.method, str(status)
            )
        count.inc()

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(_too_large(limit))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(_too_large(limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"the request body is larger than this service accepts ({limit} bytes; TANDEM_MAX_BODY_BYTES)"
