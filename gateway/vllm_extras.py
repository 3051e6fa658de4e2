"""vLLM's serving extras that benchmark tools and SDK wrappers call before or beside completions:
GET /health, GET /version, POST /tokenize and POST /detokenize. Errors take OpenAI's shape, as the
/v1/ routes' do (gateway/app.py lists these paths).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import JSONBody

from gateway import __version__
from gateway.bodies import decode_strict
from gateway.errors import InvalidRequestError, StageUnavailableError
from gateway.service import Gateway


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str
    model: str | None = None
    add_special_tokens: bool = (
        True  # accepted for vLLM's clients; the prompt is encoded as completions encode it
    )


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[int]
    model: str | None = None


def _gateway(request: Request[Any, Any, Any], model: str | None) -> Gateway:
    gw: Gateway = request.app.state.gateway
    gw.check_model(model)
    return gw


@get("/health", tags=["vllm"], sync_to_thread=False)
def health(request: Request[Any, Any, Any]) -> Response[bytes]:
    """200 with an empty body when the gateway can serve (every stage has a ready replica), else 503
    with the reason: the same answer as /readyz, in the shape vLLM's clients expect."""
    gw: Gateway = request.app.state.gateway
    ready, reason = gw.readiness()
    if not ready:
        raise StageUnavailableError(f"not ready: {reason}")
    return Response(b"", status_code=200, media_type="text/plain")


@get("/version", tags=["vllm"], sync_to_thread=False)
def version() -> dict[str, str]:
    """The server's version."""
    return {"version": __version__}


@post("/tokenize", status_code=200, tags=["vllm"])
async def tokenize(request: Request[Any, Any, Any], data: JSONBody[TokenizeRequest]) -> dict[str, Any]:
    """The prompt's token ids as the served model sees them (the tokenizer function encodes it)."""
    data, _ = await decode_strict(request, TokenizeRequest)
    gw = _gateway(request, data.model)
    gw.require_scheduler()
    (ids,) = await gw.encode([data.prompt])
    assert gw.layout is not None  # set with the scheduler
    return {"count": len(ids), "max_model_len": gw.layout.max_positions, "tokens": ids}


@post("/detokenize", status_code=200, tags=["vllm"])
async def detokenize(request: Request[Any, Any, Any], data: JSONBody[DetokenizeRequest]) -> dict[str, str]:
    """The text of a list of token ids."""
    data, _ = await decode_strict(request, DetokenizeRequest)
    gw = _gateway(request, data.model)
    gw.require_scheduler()
    assert gw.tokenizer is not None and gw.layout is not None
    bad = [t for t in data.tokens if not 0 <= t < gw.layout.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {gw.layout.vocab_size})", param="tokens"
        )
    return {"prompt": gw.tokenizer.decode(data.tokens)}


vllm_routes = [health, version, tokenize, detokenize]
OPENAI_SHAPED = frozenset(str(r.paths.copy().pop()) for r in vllm_routes)  # their errors: OpenAI's shape
