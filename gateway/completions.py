"""POST /v1/completions, OpenAI's text completions (streaming with SSE): the wire type with its
conversion to sampling parameters, the whole answer, and the stream's chunk shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from litestar import Request, Response, post
from litestar.params import JSONBody
from opentelemetry import trace

from gateway.bodies import decode_strict
from gateway.errors import InvalidRequestError
from gateway.openai_common import SamplingFields, ignored_fields, ignored_header, refuse_set, usage
from gateway.params import best, choices_from
from gateway.scoring import choice_logprobs, logprobs_object
from gateway.sequence import Event, SamplingParams, Sequence
from gateway.service import Gateway, disconnected
from gateway.sse import StreamPlan, event_stream

ROUTE = "/v1/completions"


class CompletionRequest(SamplingFields, kw_only=True):
    # a string, a list of strings, a list of token ids, or a list of token-id lists (msgspec allows
    # one array type per union, so the mixed forms are rejected in `prompts`)
    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    # known to OpenAI's API but not supported here: refused with a 400 that names them when set
    suffix: str | None = None

    def prompts(self) -> tuple[list[str] | None, list[list[int]] | None]:
        p = self.prompt
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

    def to_sampling_params(self, gw: Gateway) -> tuple[SamplingParams, int, int]:
        """The sampling parameters, the choices returned per prompt and the sequences generated
        per prompt (best_of); refuses what this server does not support, naming it."""
        gw.check_model(self.model)
        refuse_set(self, ["suffix"], "")
        n, generated = choices_from(self.n, self.best_of, self.stream)
        scoring = self.echo and self.logprobs is not None
        if self.echo and self.stream:
            raise InvalidRequestError("echo is not supported with stream", param="echo")
        if scoring and generated > 1:
            raise InvalidRequestError(
                "echo with logprobs (prompt scoring) takes n = 1 and no best_of: score once, then sample",
                param="n" if self.n > 1 else "best_of",
            )
        if scoring and gw.layout is not None and not gw.layout.scoring:
            raise InvalidRequestError(
                "echo with logprobs scores the prompt, which needs the scoring head this model's bundle was "
                "exported without: re-export it with `python -m export`",
                param="echo",
            )
        max_tokens = gw.cfg.default_max_tokens if self.max_tokens is None else self.max_tokens
        # best_of ranks by cumulative logprob
        wanted = self.logprobs is not None or generated > n
        params = self.sampling(max_tokens, logprobs=wanted, top_logprobs=self.logprobs or 0, echo=self.echo)
        return params, n, generated


class TextShape:
    """Stream chunks of text completions: `text` per token, legacy `logprobs` when asked."""

    def __init__(self, gw: Gateway, params: SamplingParams, want_logprobs: bool, choices: int):
        self.gw, self.params, self.want_logprobs = gw, params, want_logprobs
        self.offsets = [0] * choices  # characters of each choice's text so far (text_offset)

    def opening(self, i: int) -> dict[str, Any] | None:
        return None

    def token(self, i: int, ev: Event) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": i, "text": ev.text, "logprobs": None, "finish_reason": None}
        if self.want_logprobs:
            tops = [ev.top] if self.params.top_logprobs else None
            lps = logprobs_object(self.gw.token_text, [ev.token_id], [ev.logprob], tops, self.offsets[i])
            self.offsets[i] += len(lps["tokens"][0])
            choice["logprobs"] = lps
        return choice

    def finish(self, i: int, reason: str | None) -> dict[str, Any]:
        return {"index": i, "text": "", "logprobs": None, "finish_reason": reason}


@post(ROUTE, status_code=200, tags=["openai"])
async def completions(request: Request[Any, Any, Any], data: JSONBody[CompletionRequest]) -> Any:
    """OpenAI-compatible text completion (streaming with `stream: true`)."""
    gw: Gateway = request.app.state.gateway
    t0 = time.perf_counter()
    data, unknown = await decode_strict(request, CompletionRequest)
    headers = ignored_header(ignored_fields(request, unknown, gw.cfg.strict_fields))
    params, n, generated = data.to_sampling_params(gw)
    texts, ids = data.prompts()
    seqs = await gw.admit(params, texts=texts, ids=ids, n=generated)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
    base["model"] = gw.cfg.model_name
    if data.stream:
        include, continuous = data.usage_options()
        prompt_tokens = sum(len(s.prompt) for s in seqs[::n])
        plan = StreamPlan(base, ROUTE, prompt_tokens, include, continuous, t0)
        shape = TextShape(gw, params, data.logprobs is not None, len(seqs))
        return event_stream(gw, seqs, shape, plan, headers)
    every = await gw.collect(seqs, disconnected(request))
    outs = best(every, n, generated, lambda o: sum(lp or 0.0 for lp in o.logprobs))
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
                gw.token_text, firsts[i // n], o.token_ids, o.logprobs, o.tops, data.echo
            )
            if data.logprobs is not None
            else None,
        }
        for i, o in enumerate(outs)
    ]
    # the prompt once per prompt; every generated token, best_of's discarded ones included
    counts = usage(sum(o.prompt_tokens for o in every[::generated]), sum(len(o.token_ids) for o in every))
    gw.annotate_response(
        trace.get_current_span(), seqs, counts["completion_tokens"], [o.finish_reason for o in every]
    )
    gw.metrics.record_request(ROUTE, 200, time.perf_counter() - t0)
    return Response({**base, "choices": choices, "usage": counts}, headers=headers)


def _prompt_text(gw: Gateway, texts: list[str] | None, i: int, seq: Sequence) -> str:
    """Prompt i as text, for echo: as sent, or decoded from the token ids sent."""
    return texts[i] if texts is not None else gw.decode(seq.prompt)
