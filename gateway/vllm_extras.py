"""vLLM's serving extras that benchmark tools and SDK wrappers call before or beside completions:
GET /health, GET /version, POST /tokenize (a prompt, or chat messages rendered with the chat
template as /v1/chat/completions renders them) and POST /detokenize. Errors take OpenAI's shape, as
the /v1/ routes' do (gateway/app.py lists these paths).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import JSONBody

from gateway import __version__
from gateway.bodies import decode_strict
from gateway.chat_wire import ChatCompletionRequest, ChatMessage, chat_prompt
from gateway.errors import InvalidRequestError, StageUnavailableError
from gateway.service import Gateway


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A `prompt`, or chat `messages` with the chat route's rendering options (not both)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    model: str | None = None
    # as the generation routes encode: none added (for messages the template writes them)
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    async def ids(self, gw: Gateway) -> list[int]:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("send a prompt or messages (one of them)", param="messages")
        if self.messages is not None:
            chat = ChatCompletionRequest(
                messages=self.messages,
                add_generation_prompt=self.add_generation_prompt,
                continue_final_message=self.continue_final_message,
                chat_template_kwargs=self.chat_template_kwargs,
                add_special_tokens=self.add_special_tokens,
            )
            if chat.continue_final_message and chat.add_generation_prompt:
                chat.to_sampling_params(gw)  # its 400 says how to ask
            return await chat_prompt(gw, chat)
        (ids,) = await gw.encode([str(self.prompt)], add_special_tokens=self.add_special_tokens)
        return ids


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
    """The prompt's token ids as the served model sees them (the tokenizer function encodes it), or
    those of chat messages rendered with the model's chat template."""
    data, _ = await decode_strict(request, TokenizeRequest)
    gw = _gateway(request, data.model)
    layout, _ = gw.ready_layout()
    ids = await data.ids(gw)
    return {"count": len(ids), "max_model_len": layout.max_positions, "tokens": ids}


@post("/detokenize", status_code=200, tags=["vllm"])
async def detokenize(request: Request[Any, Any, Any], data: JSONBody[DetokenizeRequest]) -> dict[str, str]:
    """The text of a list of token ids."""
    data, _ = await decode_strict(request, DetokenizeRequest)
    gw = _gateway(request, data.model)
    layout, _ = gw.ready_layout()
    bad = [t for t in data.tokens if not 0 <= t < layout.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {layout.vocab_size})", param="tokens"
        )
    return {"prompt": gw.decode(data.tokens)}


vllm_routes = [health, version, tokenize, detokenize]
OPENAI_SHAPED = frozenset(str(r.paths.copy().pop()) for r in vllm_routes)  # their errors: OpenAI's shape
