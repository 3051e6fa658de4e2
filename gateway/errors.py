"""The gateway's one exception tree. Downstream failures become these at one boundary
(gateway/clients.py); anything else a route raises (Litestar's validation and HTTP errors, or a bug)
becomes one of these in `as_gateway_error`, so every error has one status and one message.

    GatewayError (500)
    ├── InvalidRequestError (400)       bad parameters, named
    ├── UnauthorizedError (401)         missing or wrong API key
    ├── NotFoundError (404)             unknown model or route
    ├── MethodNotAllowedError (405)
    ├── RequestTimeoutError (408)       a request body that stalled (functions.timeouts)
    ├── PayloadTooLargeError (413)
    ├── UnsupportedMediaTypeError (415)
    ├── OverloadedError (429)           queue full; carries Retry-After
    ├── ClientClosedError (499)         the client went away (never sent, only counted)
    └── StageError (502)                a stage answered something unusable
        ├── StageUnavailableError (503)  no ready replica / refused connections
        └── StageTimeoutError (504)
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from litestar.exceptions import HTTPException

from functions.errors import FunctionError, body_problem, validation_detail

logger = logging.getLogger("tandem.gateway")


class GatewayError(Exception):
    status_code: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        self.headers = headers or {}
        self.extra = extra or {}


class InvalidRequestError(GatewayError):
    status_code = 400
    openai_type = "invalid_request_error"
    title = "Bad Request"


class UnauthorizedError(GatewayError):
    status_code = 401
    openai_type = "authentication_error"
    title = "Unauthorized"


class NotFoundError(GatewayError):
    status_code = 404
    openai_type = "invalid_request_error"
    title = "Not Found"


class MethodNotAllowedError(GatewayError):
    status_code = 405
    openai_type = "invalid_request_error"
    title = "Method Not Allowed"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    openai_type = "invalid_request_error"
    title = "Payload Too Large"


class RequestTimeoutError(GatewayError):
    status_code = 408
    openai_type = "invalid_request_error"
    title = "Request Timeout"


class UnsupportedMediaTypeError(GatewayError):
    status_code = 415
    openai_type = "invalid_request_error"
    title = "Unsupported Media Type"


class OverloadedError(GatewayError):
    status_code = 429
    openai_type = "rate_limit_error"
    title = "Too Many Requests"


class ClientClosedError(GatewayError):
    status_code = 499
    openai_type = "invalid_request_error"
    title = "Client Closed Request"


class StageError(GatewayError):
    status_code = 502
    title = "Bad Gateway"


class StageUnavailableError(StageError):
    status_code = 503
    title = "Service Unavailable"


class StageTimeoutError(StageError):
    status_code = 504
    title = "Gateway Timeout"


_BY_STATUS: dict[int, type[GatewayError]] = {
    e.status_code: e
    for e in (
        InvalidRequestError,
        UnauthorizedError,
        NotFoundError,
        MethodNotAllowedError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        RequestTimeoutError,
        OverloadedError,
    )
}
_BY_STATUS[503] = StageUnavailableError


def as_gateway_error(exc: BaseException, method: str, path: str) -> GatewayError:
    """Any exception raised while answering `method path`, as the gateway error to answer with."""
    if isinstance(exc, GatewayError):
        return exc
    undecodable = body_problem(exc)
    if undecodable is not None:
        return InvalidRequestError(undecodable)
    if isinstance(exc, FunctionError) and exc.status_code in _BY_STATUS:  # raised below the routes
        return _BY_STATUS[exc.status_code](exc.detail)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        headers = dict(exc.headers or {})
        if status == 400:
            return InvalidRequestError(validation_detail(exc), headers=headers)
        if status == 404:
            return NotFoundError(f"no route matches {method} {path}; see /docs for the API", headers=headers)
        if status == 405:
            return MethodNotAllowedError(
                f"{method} is not allowed on {path}; see /docs for the API", headers=headers
            )
        if status == 413:
            return PayloadTooLargeError(
                "the request body is larger than this service accepts (TANDEM_MAX_BODY_BYTES)",
                headers=headers,
            )
        kind = _BY_STATUS.get(status)
        if kind is not None:
            return kind(str(exc.detail), headers=headers)
    logger.error("unexpected error on %s %s", method, path, exc_info=exc)
    return GatewayError("internal error; the traceback is in the gateway log")
