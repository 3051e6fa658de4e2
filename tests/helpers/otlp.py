"""A tiny OTLP/HTTP trace receiver for tests: `POST /v1/traces` with protobuf bodies, spans kept
as flat records in memory.

    with OtlpReceiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint}
        ...
        spans = otlp.wait_for(lambda spans: ..., timeout=10)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class SpanRecord:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None  # 16 hex digits, None for a root span
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ... (SPAN_KIND_ prefix dropped)
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id) of each linked span
    start_ns: int = 0
    end_ns: int = 0


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def decode_spans(body: bytes) -> list[SpanRecord]:
    """Flat records of every span in one ExportTraceServiceRequest."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append(
                    SpanRecord(
                        service=service,
                        name=sp.name,
                        trace_id=sp.trace_id.hex(),
                        span_id=sp.span_id.hex(),
                        parent_span_id=sp.parent_span_id.hex() or None,
                        kind=Span.SpanKind.Name(sp.kind).removeprefix("SPAN_KIND_"),
                        attributes={kv.key: _value(kv.value) for kv in sp.attributes},
                        links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in sp.links),
                        start_ns=sp.start_time_unix_nano,
                        end_ns=sp.end_time_unix_nano,
                    )
                )
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests session expects

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's naming)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.split("?")[0] != "/v1/traces":
            self._answer(404, b"", "text/plain")
            return
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            spans = decode_spans(body)
        except Exception as exc:  # a malformed export is a test failure, not a server crash
            self.server.receiver._errors.append(f"{type(exc).__name__}: {exc}")
            self._answer(400, str(exc).encode(), "text/plain")
            return
        self.server.receiver._add(spans)
        self._answer(200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)

    def _answer(self, status: int, body: bytes, media: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        pass  # quiet: one line per export would bury the test output


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver


class OtlpReceiver:
    """Listens on 127.0.0.1 (a free port) in a thread from `start()` (or `with`) to `stop()`."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spans: list[SpanRecord] = []
        self._errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the receiver is not started"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def start(self) -> OtlpReceiver:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # waits for serve_forever to return
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, spans: list[SpanRecord]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self._lock.notify_all()

    def spans(self, trace_id: str | None = None) -> list[SpanRecord]:
        """Every span received so far (of one trace when `trace_id` is given)."""
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(
        self, done: Callable[[list[SpanRecord]], bool], trace_id: str | None = None, timeout: float = 10.0
    ) -> list[SpanRecord]:
        """The spans (of `trace_id`) once `done(spans)` holds; after `timeout`, whatever arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                spans = [s for s in self._spans if trace_id is None or s.trace_id == trace_id]
                left = deadline - time.monotonic()
                if done(spans) or left <= 0:
                    return spans
                self._lock.wait(min(left, 0.1))
