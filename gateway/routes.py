"""The original contract, POST /api/model/process: text in, generated text plus processing
metrics out. Generation parameters are accepted at the top level or inside `metadata`."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, post
from litestar.params import JSONBody
from opentelemetry import trace

from gateway.bodies import decode_strict
from gateway.errors import InvalidRequestError
from gateway.params import sampling_from
from gateway.sequence import SamplingParams
from gateway.service import Gateway, disconnected
from gateway.tracing import current_trace_id

ROUTE = "/api/model/process"

PARAMS: dict[str, type | tuple[type, ...]] = {
    "max_tokens": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "seed": int,
    "stop": (str, list),
    "ignore_eos": bool,
}


class ProcessRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    metadata: dict[str, Any] = {}
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None


def _params(data: ProcessRequest, default_max: int) -> SamplingParams:
    merged: dict[str, Any] = {}
    for key, kinds in PARAMS.items():
        if key in data.metadata:
            v = data.metadata[key]
            if isinstance(v, bool) and kinds is not bool or not isinstance(v, kinds):
                raise InvalidRequestError(
                    f"metadata.{key} has the wrong type ({type(v).__name__})", param=f"metadata.{key}"
                )
            merged[key] = v
        top = getattr(data, key)
        if top is not None:
            merged[key] = top
    stop = merged.get("stop") or []
    return sampling_from(
        max_tokens=merged.get("max_tokens", default_max),
        temperature=float(merged.get("temperature", 0.0)),
        top_p=float(merged.get("top_p", 1.0)),
        top_k=merged.get("top_k", 0),
        seed=merged.get("seed"),
        stop=[stop] if isinstance(stop, str) else list(stop),
        ignore_eos=merged.get("ignore_eos", False),
        logprobs=False,
    )


@post(ROUTE, status_code=200, tags=["tandem"])
async def process(request: Request[Any, Any, Any], data: JSONBody[ProcessRequest]) -> dict[str, Any]:
    """Generate a continuation of `text` (greedy unless temperature is given)."""
    gw: Gateway = request.app.state.gateway
    t0 = time.perf_counter()
    data, _ = await decode_strict(request, ProcessRequest)
    params = _params(data, gw.cfg.default_max_tokens)
    seqs = await gw.admit(params, texts=[data.text], param="text")
    (out,) = await gw.collect(seqs, disconnected(request))
    gw.annotate_response(trace.get_current_span(), seqs, len(out.token_ids), [out.finish_reason])
    gw.metrics.record_request(ROUTE, 200, time.perf_counter() - t0)
    n = len(out.token_ids)
    decode_s = out.seconds - (out.ttft or 0.0)
    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "model": gw.cfg.model_name,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": n,
        "metrics": {
            "time_to_first_token_ms": round((out.ttft or 0.0) * 1000, 2),
            "total_ms": round(out.seconds * 1000, 2),
            "tokens_per_second": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
            "stage_ms": {k: round(v * 1000, 2) for k, v in out.stage_seconds.items()},
            "metadata": data.metadata,
        },
        "trace_id": current_trace_id(),  # the X-Trace-Id header's value (gateway.tracing)
    }
