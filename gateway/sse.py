"""The server-sent events renderer both generation routes stream with. A route says what its
chunks look like (a Shape: the choice object of an opening chunk, of a token, of a finish); the
renderer does the rest the same way for both: chunks as the sequences' events arrive, usage in every
chunk or in a last chunk of its own when asked (with the time spent in each stage, a tandem
extension), `data: [DONE]`, an error event (OpenAI's error body) when generation fails, and the
request's metrics and span attributes however the stream ends (499 when the client went away).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from litestar.response import Stream
from opentelemetry import trace

from gateway.openai_common import openai_error_body, usage
from gateway.sequence import Event, Sequence
from gateway.service import Gateway

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class EventStream(Stream):
    """Server-sent events. Litestar's Stream lets the handler's default media type (JSON) win
    over its own; this one keeps text/event-stream."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


class Shape(Protocol):
    """The choice objects of one route's chunks, choice `i` (a sequence's index)."""

    def opening(self, i: int) -> dict[str, Any] | None: ...

    def token(self, i: int, ev: Event) -> dict[str, Any]: ...

    def finish(self, i: int, reason: str | None) -> dict[str, Any]: ...


@dataclass
class StreamPlan:
    base: dict[str, Any]  # id, object, created, model: in every chunk
    route: str  # the metrics' route label
    prompt_tokens: int
    include_usage: bool = False
    continuous: bool = False  # usage so far in every chunk (vLLM's continuous_usage_stats)
    t0: float = 0.0  # when the request arrived (perf_counter)
    span: trace.Span | None = None  # the request's span: still open while the stream is sent


def event_stream(
    gw: Gateway, seqs: list[Sequence], shape: Shape, plan: StreamPlan, headers: dict[str, str]
) -> EventStream:
    plan.span = plan.span or trace.get_current_span()
    return EventStream(
        render(gw, seqs, shape, plan), media_type="text/event-stream", headers={**headers, **HEADERS}
    )


async def render(gw: Gateway, seqs: list[Sequence], shape: Shape, plan: StreamPlan) -> AsyncIterator[bytes]:
    counts = [0] * len(seqs)
    reasons: list[str | None] = [None] * len(seqs)
    status = 499  # unless the stream reaches its end or an error

    def chunk(choice: dict[str, Any]) -> bytes:
        out = {**plan.base, "choices": [choice]}
        if plan.include_usage:
            out["usage"] = usage(plan.prompt_tokens, sum(counts)) if plan.continuous else None
        return sse(out)

    try:
        for i in range(len(seqs)):
            opening = shape.opening(i)
            if opening is not None:
                yield chunk(opening)
        async with contextlib.aclosing(gw.stream(seqs)) as events:
            async for i, ev in events:
                if ev.kind == "error":
                    assert ev.error is not None
                    status = ev.error.status_code
                    yield sse(openai_error_body(ev.error))
                    return
                if ev.kind == "token":
                    counts[i] += 1
                    yield chunk(shape.token(i, ev))
                else:
                    reasons[i] = ev.finish_reason
                    yield chunk(shape.finish(i, ev.finish_reason))
        if plan.include_usage:
            figures = {"stage_ms": gw.stage_ms(seqs)}  # extension, as /api/model/process reports it
            yield sse(
                {
                    **plan.base,
                    "choices": [],
                    "usage": usage(plan.prompt_tokens, sum(counts)),
                    "metrics": figures,
                }
            )
        yield DONE
        status = 200
    finally:
        # reached on normal end, on error, and when the client disconnects (the stream is cancelled)
        gw.annotate_response(plan.span or trace.get_current_span(), seqs, sum(counts), reasons)
        gw.metrics.record_request(plan.route, status, time.perf_counter() - plan.t0)
