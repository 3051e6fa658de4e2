"""The OpenAI-compatible surface: POST /v1/completions (gateway.completions), POST
/v1/chat/completions (gateway.chat) and GET /v1/models. Errors under /v1/ take OpenAI's shape:
{"error": {"message", "type", "param", "code"}} (gateway.openai_common).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from gateway.chat import chat_completions
from gateway.completions import completions
from gateway.openai_common import IGNORED_HEADER, openai_error_body
from gateway.service import Gateway

__all__ = ["IGNORED_HEADER", "openai_error_body", "openai_routes"]


@get("/v1/models", tags=["openai"], sync_to_thread=False)
def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The served model (OpenAI shape)."""
    gw: Gateway = request.app.state.gateway
    meta = {"max_model_len": gw.layout.max_positions, "root": gw.layout.model_id} if gw.layout else {}
    return {
        "object": "list",
        "data": [{"id": gw.cfg.model_name, "object": "model", "created": 0, "owned_by": "tandem", **meta}],
    }


openai_routes = [completions, chat_completions, models]
