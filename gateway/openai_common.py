"""What /v1/completions and /v1/chat/completions share on the wire: the sampling fields and their
conversion to SamplingParams, `stream_options`, usage, OpenAI's error body, and unknown fields
(ignored and named in a response header, as vLLM does, or refused with strict_fields).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import Any
from urllib.parse import quote

import msgspec
from litestar import Request

from gateway.errors import GatewayError, InvalidRequestError
from gateway.params import sampling_from
from gateway.sequence import SamplingParams

logger = logging.getLogger("tandem.gateway")

IGNORED_HEADER = "X-Tandem-Ignored-Fields"
IGNORED_HEADER_MAX = 1024  # characters of the header value; a longer list ends with ", ..."


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension: usage (so far) in every chunk


class SamplingFields(msgspec.Struct, kw_only=True):
    """The request fields both generation routes take. Unknown fields are ignored and named in the
    IGNORED_HEADER response header, or refused when the gateway runs with strict_fields."""

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens
    repetition_penalty: float = 1.0  # extension (as in vLLM)
    min_tokens: int = 0  # extension (as in vLLM)

    def sampling(
        self, max_tokens: int, *, logprobs: bool, top_logprobs: int = 0, echo: bool = False
    ) -> SamplingParams:
        """These fields as SamplingParams (checked: a 400 names the field that is out of range)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return sampling_from(
            max_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.seed,
            stop,
            self.ignore_eos,
            logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias,
            min_tokens=self.min_tokens,
            top_logprobs=top_logprobs,
            echo=echo,
        )

    def usage_options(self) -> tuple[bool, bool]:
        """(usage in the last chunk, usage so far in every chunk) of a stream."""
        include = bool(self.stream_options and self.stream_options.include_usage)
        return include, bool(include and self.stream_options and self.stream_options.continuous_usage_stats)


def refuse_set(data: msgspec.Struct, names: Seq[str], why: str) -> None:
    """A 400 naming the first of these fields that is set (not None, not empty)."""
    for name in names:
        if getattr(data, name) not in (None, [], {}):
            raise InvalidRequestError(f"{name} is not supported{why}", param=name)


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


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
