"""POST /v1/chat/completions: OpenAI's chat API (vLLM's semantics) over the model's own chat
template. The whole answer (`chat.completion`, one message per choice) or a stream of
`chat.completion.chunk`s as vLLM sends them: per choice a first chunk with `delta.role`, a content
delta per token, a chunk with the finish reason; then, when asked, a usage chunk with `choices: []`,
then `[DONE]`. Log-probabilities take the chat shape: `{"content": [{token, logprob, bytes,
top_logprobs}]}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from litestar import Request, Response, post
from litestar.params import JSONBody
from opentelemetry import trace

from gateway.bodies import decode_strict
from gateway.chat_wire import ChatCompletionRequest, chat_prompt
from gateway.openai_common import ignored_fields, ignored_header, usage
from gateway.sequence import Event, Top
from gateway.service import Gateway, disconnected
from gateway.sse import StreamPlan, event_stream

ROUTE = "/v1/chat/completions"


class ChatLogprobs:
    """Log-probabilities in the chat shape, tokens as their text (or "token_id:{id}", vLLM's
    return_tokens_as_token_ids)."""

    def __init__(self, gw: Gateway, as_ids: bool):
        self.gw, self.as_ids = gw, as_ids

    def token(self, t: int) -> str:
        return f"token_id:{t}" if self.as_ids else self.gw.token_text(t)

    def entry(self, t: int, logprob: float | None) -> dict[str, Any]:
        text = self.token(t)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def content(self, ids: list[int], lps: list[float | None], tops: list[Top | None]) -> dict[str, Any]:
        return {
            "content": [
                {**self.entry(t, lp), "top_logprobs": [self.entry(a, v) for a, v in top or ()]}
                for t, lp, top in zip(ids, lps, tops, strict=True)
            ]
        }


class ChatShape:
    """Stream chunks of chat completions (the `delta` form)."""

    def __init__(self, logprobs: ChatLogprobs | None, echoed: str):
        self.logprobs, self.echoed = logprobs, echoed

    def opening(self, i: int) -> dict[str, Any] | None:
        delta = {"role": "assistant", "content": self.echoed}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}

    def token(self, i: int, ev: Event) -> dict[str, Any]:
        lps = self.logprobs.content([ev.token_id], [ev.logprob], [ev.top]) if self.logprobs else None
        return {"index": i, "delta": {"content": ev.text}, "logprobs": lps, "finish_reason": None}

    def finish(self, i: int, reason: str | None) -> dict[str, Any]:
        return {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}


@post(ROUTE, status_code=200, tags=["openai"])
async def chat_completions(request: Request[Any, Any, Any], data: JSONBody[ChatCompletionRequest]) -> Any:
    """OpenAI-compatible chat completion over the model's chat template (streaming with `stream: true`)."""
    gw: Gateway = request.app.state.gateway
    t0 = time.perf_counter()
    data, unknown = await decode_strict(request, ChatCompletionRequest)
    headers = ignored_header(ignored_fields(request, unknown, gw.cfg.strict_fields))
    params, n = data.to_sampling_params(gw)
    echoed = data.echoed()
    ids = await chat_prompt(gw, data)
    seqs = await gw.admit(params, ids=[ids], param="messages", operation="chat", n=n)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": gw.cfg.model_name}
    logprobs = ChatLogprobs(gw, data.return_tokens_as_token_ids) if data.logprobs else None
    if data.stream:
        include, continuous = data.usage_options()
        plan = StreamPlan(
            {**base, "object": "chat.completion.chunk"}, ROUTE, len(ids), include, continuous, t0
        )
        return event_stream(gw, seqs, ChatShape(logprobs, echoed), plan, headers)
    outs = await gw.collect(seqs, disconnected(request))
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": echoed + o.text},
            "logprobs": logprobs.content(o.token_ids, list(o.logprobs), o.tops) if logprobs else None,
            "finish_reason": o.finish_reason,
        }
        for i, o in enumerate(outs)
    ]
    counts = usage(len(ids), sum(len(o.token_ids) for o in outs))
    gw.annotate_response(
        trace.get_current_span(), seqs, counts["completion_tokens"], [o.finish_reason for o in outs]
    )
    gw.metrics.record_request(ROUTE, 200, time.perf_counter() - t0)
    return Response(
        {**base, "object": "chat.completion", "choices": choices, "usage": counts}, headers=headers
    )
