"""OpenAI-compatible API: POST /v1/completions (streaming with SSE) and GET /v1/models.
Errors here take OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import Any
from urllib.parse import quote

import msgspec
from litestar import Request, Response, get, post
from litestar.params import JSONBody
from litestar.response import Stream
from opentelemetry import trace

from gateway.bodies import decode_strict
from gateway.errors import GatewayError, InvalidRequestError
from gateway.params import best, choices_from, sampling_from
from gateway.scoring import choice_logprobs, logprobs_object
from gateway.sequence import Event, SamplingParams, Sequence
from gateway.service import Gateway, disconnected

logger = logging.getLogger("tandem.gateway")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension: usage (so far) in every chunk


class CompletionRequest(msgspec.Struct):
    """Unknown fields are ignored and named in the IGNORED_HEADER response header (as vLLM does),
    or refused when the gateway runs with strict_fields."""

    # a string, a list of strings, a list of token ids, or a list of token-id lists (msgspec allows
    # one array type per union, so the mixed forms are rejected in _prompts)
    prompt: str | list[str | int | list[int]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens
    repetition_penalty: float = 1.0  # extension (as in vLLM)
    min_tokens: int = 0  # extension (as in vLLM)
    # known to OpenAI's API but not supported here: refused with a 400 that names them when set
    suffix: str | None = None


IGNORED_HEADER = "X-Tandem-Ignored-Fields"
IGNORED_HEADER_MAX = 1024  # characters of the header value; a longer list ends with ", ..."
_UNSUPPORTED = ("suffix",)


def ignored_fields(request: Request[Any, Any, Any], unknown: list[str], strict: bool) -> list[str]:
    """Unknown top-level fields: logged and returned (the caller names them in a header), or a 400
    in strict mode."""
    if unknown and strict:
        raise InvalidRequestError(
            f"unknown field(s) {unknown} (this gateway runs with strict_fields)", param=unknown[0]
        )
    if unknown:
        logger.warning("ignored unknown request field(s) %s on %s", unknown, request.url.path)
    return unknown


def ignored_header(ignored: Seq[str]) -> dict[str, str]:
    """The IGNORED_HEADER for these field names: each percent-encoded (a name is any JSON string,
    and a newline or a non-ASCII character in a header value makes the server drop the connection),
    joined with ", ", at most IGNORED_HEADER_MAX characters."""
    if not ignored:
        return {}
    value = ", ".join(quote(name, safe="") for name in ignored)
    if len(value) > IGNORED_HEADER_MAX:
        value = value[: IGNORED_HEADER_MAX - 5] + ", ..."
    return {IGNORED_HEADER: value}


class EventStream(Stream):
    """Server-sent events. Litestar's Stream lets the handler's default media type (JSON) win
    over its own; this one keeps text/event-stream."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def openai_error_body(err: GatewayError) -> dict[str, Any]:
    """OpenAI's error shape for a gateway error (also sent as an SSE event when a stream fails)."""
    return {
        "error": {
            "message": err.message,
            "type": err.openai_type,
            "param": err.param,
            "code": err.status_code,
        }
    }


def _prompts(data: CompletionRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    p = data.prompt
    if isinstance(p, str):
        return [p], None
    if not p:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    strs = [x for x in p if isinstance(x, str)]
    ints = [x for x in p if isinstance(x, int)]
    lists = [x for x in p if isinstance(x, list)]
    if len(strs) == len(p):
        return strs, None
    if len(ints) == len(p):
        return None, [ints]
    if len(lists) == len(p):
        return None, [list(x) for x in lists]
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, a list of token ids, or a list of "
        "token-id lists, not a mix",
        param="prompt",
    )


def _params(gw: Gateway, data: CompletionRequest) -> tuple[SamplingParams, int, int]:
    """The request's sampling parameters, the choices returned per prompt and the sequences
    generated per prompt (best_of); refuses what this server does not support, naming it."""
    gw.check_model(data.model)
    for name in _UNSUPPORTED:
        if getattr(data, name) is not None:
            raise InvalidRequestError(f"{name} is not supported", param=name)
    n, generated = choices_from(data.n, data.best_of, data.stream)
    if data.echo and data.stream:
        raise InvalidRequestError("echo is not supported with stream", param="echo")
    if data.echo and data.logprobs is not None and generated > 1:
        raise InvalidRequestError(
            "echo with logprobs (prompt scoring) takes n = 1 and no best_of: score once, then sample",
            param="n" if data.n > 1 else "best_of",
        )
    if data.echo and data.logprobs is not None and gw.layout is not None and not gw.layout.scoring:
        raise InvalidRequestError(
            "echo with logprobs scores the prompt, which needs the scoring head this model's bundle was "
            "exported without: re-export it with `python -m export`",
            param="echo",
        )
    max_tokens = gw.cfg.default_max_tokens if data.max_tokens is None else data.max_tokens
    stop = [data.stop] if isinstance(data.stop, str) else list(data.stop or [])
    params = sampling_from(
        max_tokens,
        data.temperature,
        data.top_p,
        data.top_k,
        data.seed,
        stop,
        data.ignore_eos,
        data.logprobs is not None or generated > n,  # best_of ranks by cumulative logprob
        presence_penalty=data.presence_penalty,
        frequency_penalty=data.frequency_penalty,
        repetition_penalty=data.repetition_penalty,
        logit_bias=data.logit_bias,
        min_tokens=data.min_tokens,
        top_logprobs=data.logprobs or 0,
        echo=data.echo,
    )
    return params, n, generated


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(gw: Gateway, token: int) -> str:
    return gw.tokenizer.decode([token]) if gw.tokenizer is not None else ""


def _prompt_text(gw: Gateway, texts: list[str] | None, i: int, seq: Sequence) -> str:
    """Prompt i as text, for echo: as sent, or decoded from the token ids sent."""
    if texts is not None:
        return texts[i]
    return gw.tokenizer.decode(seq.prompt) if gw.tokenizer is not None else ""


ROUTE = "/v1/completions"


@post(ROUTE, status_code=200, tags=["openai"])
async def completions(request: Request[Any, Any, Any], data: JSONBody[CompletionRequest]) -> Any:
    """OpenAI-compatible text completion (streaming with `stream: true`)."""
    gw: Gateway = request.app.state.gateway
    t0 = time.perf_counter()
    data, unknown = await decode_strict(request, CompletionRequest)
    ignored = ignored_fields(request, unknown, gw.cfg.strict_fields)
    params, n, generated = _params(gw, data)
    want_logprobs = data.logprobs is not None
    texts, ids = _prompts(data)
    seqs = await gw.admit(params, texts=texts, ids=ids, n=generated)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = ignored_header(ignored)
    base = {"id": cid, "object": "text_completion", "created": created, "model": gw.cfg.model_name}

    if not data.stream:
        every = await gw.collect(seqs, disconnected(request))
        outs = best(every, n, generated, lambda o: sum(lp or 0.0 for lp in o.logprobs))

        def text_of(t: int) -> str:
            return _token_text(gw, t)

        # choice i answers prompt i // n; its prompt (and, with echo scoring, its scores: then
        # generated is 1) from that prompt's first sequence
        firsts = seqs[::generated]
        echoed = [_prompt_text(gw, texts, p, s) if data.echo else "" for p, s in enumerate(firsts)]
        choices = [
            {
                "index": i,
                "text": echoed[i // n] + o.text,
                "finish_reason": o.finish_reason,
                "logprobs": choice_logprobs(
                    text_of, firsts[i // n], o.token_ids, o.logprobs, o.tops, data.echo
                )
                if want_logprobs
                else None,
            }
            for i, o in enumerate(outs)
        ]
        # the prompt once per prompt; every generated token, best_of's discarded ones included
        prompt_tokens = sum(o.prompt_tokens for o in every[::generated])
        usage = _usage(prompt_tokens, sum(len(o.token_ids) for o in every))
        reasons = [o.finish_reason for o in every]
        gw.annotate_response(trace.get_current_span(), seqs, usage["completion_tokens"], reasons)
        gw.metrics.record_request(ROUTE, 200, time.perf_counter() - t0)
        return Response({**base, "choices": choices, "usage": usage}, headers=headers)

    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    continuous = bool(include_usage and data.stream_options and data.stream_options.continuous_usage_stats)
    prompt_tokens = sum(len(s.prompt) for s in seqs[::n])
    span = trace.get_current_span()  # the request's span: still open while the stream is sent

    async def events() -> AsyncIterator[bytes]:
        sched = gw.require_scheduler()
        queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        counts = [0] * len(seqs)
        offsets = [0] * len(seqs)  # characters of each choice's text so far (text_offset)
        reasons: list[str | None] = [None] * len(seqs)

        async def pump(i: int, s: Sequence) -> None:
            async for ev in sched.stream(s):
                await queue.put((i, ev))
            await queue.put((i, None))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
        status = 499  # unless the stream reaches its end or an error
        try:
            open_ = len(seqs)
            while open_:
                i, ev = await queue.get()
                if ev is None:
                    open_ -= 1
                    continue
                if ev.kind == "error":
                    assert ev.error is not None
                    status = ev.error.status_code
                    yield b"data: " + msgspec.json.encode(openai_error_body(ev.error)) + b"\n\n"
                    break
                choice: dict[str, Any] = {
                    "index": i,
                    "text": ev.text,
                    "logprobs": None,
                    "finish_reason": None,
                }
                if ev.kind == "token":
                    counts[i] += 1
                    if want_logprobs:
                        tops = [ev.top] if params.top_logprobs else None
                        lps = logprobs_object(
                            lambda t: _token_text(gw, t), [ev.token_id], [ev.logprob], tops, offsets[i]
                        )
                        offsets[i] += len(lps["tokens"][0])
                        choice["logprobs"] = lps
                else:
                    choice["finish_reason"] = reasons[i] = ev.finish_reason
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = _usage(prompt_tokens, sum(counts)) if continuous else None
                yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
            else:
                if include_usage:
                    usage = _usage(prompt_tokens, sum(counts))
                    # extension: time spent in each stage's calls, as /api/model/process reports it
                    stage_ms = {
                        p.name: round(sum(s.stage_seconds[p.index] for s in seqs) * 1000, 2)
                        for p in gw.replicas.pools
                    }
                    last = {**base, "choices": [], "usage": usage, "metrics": {"stage_ms": stage_ms}}
                    yield b"data: " + msgspec.json.encode(last) + b"\n\n"
                yield b"data: [DONE]\n\n"
                status = 200
        finally:
            # reached on normal end, on error, and when the client disconnects (the stream is cancelled)
            for s in seqs:
                sched.cancel(s)
            for p in pumps:
                p.cancel()
            gw.annotate_response(span, seqs, sum(counts), reasons)
            gw.metrics.record_request(ROUTE, status, time.perf_counter() - t0)

    return EventStream(
        events(),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@get("/v1/models", tags=["openai"], sync_to_thread=False)
def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The served model (OpenAI shape)."""
    gw: Gateway = request.app.state.gateway
    meta = {"max_model_len": gw.layout.max_positions, "root": gw.layout.model_id} if gw.layout else {}
    return {
        "object": "list",
        "data": [{"id": gw.cfg.model_name, "object": "model", "created": 0, "owned_by": "tandem", **meta}],
    }


openai_routes = [completions, models]
