"""Tracing in the gateway: the id every API response carries (`X-Trace-Id`, and `trace_id` in
/api/model/process), the OpenTelemetry GenAI attributes on a request's span, and which steps of a
long generation get stage-call spans.

The id: with tracing on, the request's trace id (32 hex digits), under which Jaeger finds the whole
trace. With tracing off (no OTEL_* endpoint) or on a route that is not traced (health, metrics), a
random id of the same form, new for every response: the client can still quote it, but no trace
is stored under it.

Long generations: every step of a sequence's first TRACED_STEPS (the prefill and the first decode
steps) gets one call span per stage; after that one step in TRACE_EVERY does. The untraced steps'
calls carry an unsampled trace context, so the stages record nothing for them either (no orphan
traces), and the request span sums them up: tandem.steps, tandem.steps_traced and
tandem.stage_seconds.<stage> (all steps, traced or not).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence as Seq
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from functions.fastpath import ASGIApp, Message, Receive, Scope, Send
from gateway.sequence import SamplingParams, Sequence

TRACE_HEADER = b"x-trace-id"
TRACED_STEPS = 16
TRACE_EVERY = 32

_tracer = trace.get_tracer("tandem.gateway")
_trace_id: ContextVar[str | None] = ContextVar("tandem_trace_id", default=None)


def current_trace_id() -> str:
    """The id this request's responses carry (see the module docstring)."""
    tid = _trace_id.get()
    if tid is None:  # outside TraceIdMiddleware (in-process callers): decide now
        tid = _from_span()
        _trace_id.set(tid)
    return tid


def _from_span() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else secrets.token_hex(16)


class TraceIdMiddleware:
    """Adds X-Trace-Id to every response of the routes it wraps (errors included). It runs inside
    the OpenTelemetry middleware, so the request's server span is current here."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tid = _from_span()
        token = _trace_id.set(tid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != TRACE_HEADER]
                message = {**message, "headers": [*headers, (TRACE_HEADER, tid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _trace_id.reset(token)


def step_traced(n_generated: int) -> bool:
    """Whether the step that produces token `n_generated` (0: the prefill) gets stage-call spans."""
    return n_generated < TRACED_STEPS or n_generated % TRACE_EVERY == 0


def unsampled(parent: trace.Span) -> trace.Span:
    """A span in `parent`'s trace with the sampled flag off: a call made under it carries a
    traceparent that tells the stage to record nothing."""
    ctx = parent.get_span_context()
    return NonRecordingSpan(
        SpanContext(ctx.trace_id, ctx.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    )


def annotate_request(
    span: trace.Span, operation: str, model: str, params: SamplingParams, inputs: int
) -> None:
    """The GenAI request attributes (OpenTelemetry semantic conventions, gen_ai.*)."""
    span.set_attribute("gen_ai.operation.name", operation)
    span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("gen_ai.request.max_tokens", params.max_tokens)
    span.set_attribute("gen_ai.request.temperature", params.temperature)
    span.set_attribute("gen_ai.request.top_p", params.top_p)
    if params.top_k:
        span.set_attribute("gen_ai.request.top_k", params.top_k)
    if params.seed is not None:
        span.set_attribute("gen_ai.request.seed", params.seed)
    span.set_attribute("gen_ai.usage.input_tokens", inputs)


def annotate_response(
    span: trace.Span,
    seqs: Seq[Sequence],
    stage_names: Seq[str],
    output_tokens: int,
    finish_reasons: Seq[str | None],
) -> None:
    """The GenAI response attributes, and the per-stage sums that stand for untraced steps."""
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    span.set_attribute("gen_ai.response.finish_reasons", [r for r in finish_reasons if r])
    steps = max((s.n_generated for s in seqs), default=0)
    span.set_attribute("tandem.steps", steps)
    span.set_attribute("tandem.steps_traced", sum(1 for n in range(steps) if step_traced(n)))
    for k, name in enumerate(stage_names):
        span.set_attribute(f"tandem.stage_seconds.{name}", round(sum(s.stage_seconds[k] for s in seqs), 6))


def call_spans(name: str, replica: str, grp: Seq[Sequence], headers: dict[str, str]) -> list[trace.Span]:
    """The spans of one stage call: one per request in the batch, each in its own request's trace
    (one trace per request); the stage's server span hangs under the first, through `headers`.
    Steps that are not traced (step_traced) get no span, and the call tells the stage not to
    record either."""
    parents = [(s.parent, s.n_generated) for s in grp if s.parent is not None and s.parent.is_recording()]
    spans = [
        _tracer.start_span(f"{name} call", context=trace.set_span_in_context(parent))
        for parent, step in parents
        if step_traced(step)
    ]
    for span in spans:
        span.set_attribute("tandem.batch_size", len(grp))
        span.set_attribute("tandem.replica", replica)
    if spans:
        inject(headers, context=trace.set_span_in_context(spans[0]))
    elif parents:
        inject(headers, context=trace.set_span_in_context(unsampled(parents[0][0])))
    return spans
