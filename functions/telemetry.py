"""OpenTelemetry setup for a function process, driven only by the standard `OTEL_*` variables.

Without an OTLP endpoint variable nothing is installed and every span is a cheap no-op.
"""

from __future__ import annotations

import os
import threading

from opentelemetry import trace

_lock = threading.Lock()
_configured = False


def tracing_requested(env: dict[str, str] | None = None) -> bool:
    """True when an OTLP endpoint is set and the SDK is not disabled."""
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service_name: str) -> bool:
    """Install a global TracerProvider exporting OTLP/HTTP, once per process.

    Returns True when tracing is (now or already) exporting, False when it stays a no-op.
    """
    global _configured
    with _lock:
        if _configured:
            return True
        if not tracing_requested():
            return False
        # Imported here so a process without tracing never loads the SDK and exporter.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _configured = True
        return True


def tracing_enabled() -> bool:
    """Whether this process exports spans (configure_tracing installed the exporter)."""
    return _configured


def get_tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op one unless `configure_tracing` installed it)."""
    return trace.get_tracer(name)
