"""The functions' exception tree and the one handler that turns any error into RFC 9457 JSON.

Every problem body also carries `error` (the detail again), the one field the Open Inference
Protocol defines for errors, and is sent as `application/json` unless the client's Accept names
`application/problem+json`: OIP clients such as the KServe SDK read only `application/json` bodies.

    FunctionError (500)
    ├── BadRequestError (400)        also: protocol.ProtocolError, contract.ContractError -> 400
    ├── UnauthorizedError (401)      no or a wrong bearer token (functions.auth)
    ├── NotFoundError (404)
    ├── ConflictError (409)
    ├── PayloadTooLargeError (413)
    └── NotReadyError (503)
Litestar's own HTTPExceptions keep their status; anything else is a 500 with a generic detail.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from functions.contract import ContractError
from functions.protocol import ProtocolError

logger = logging.getLogger("tandem.functions")

PROBLEM_JSON = "application/problem+json"
JSON = "application/json"


class FunctionError(Exception):
    """Base of the functions' errors; `extra` is merged into the problem body."""

    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}


class BadRequestError(FunctionError):
    status_code = 400
    title = "Bad Request"


class UnauthorizedError(FunctionError):
    status_code = 401
    title = "Unauthorized"


class NotFoundError(FunctionError):
    status_code = 404
    title = "Not Found"


class ConflictError(FunctionError):
    status_code = 409
    title = "Conflict"


class PayloadTooLargeError(FunctionError):
    status_code = 413
    title = "Payload Too Large"


class NotReadyError(FunctionError):
    status_code = 503
    title = "Service Unavailable"


# Litestar's default details are terse ("Not Found"): say what to do instead.
_HTTP_DETAILS = {
    404: "no route matches {method} {path}; see /docs for the API",
    405: "{method} is not allowed on {path}; see /docs for the API",
    413: "the request body is larger than this service accepts (TANDEM_MAX_BODY_BYTES)",
}
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
}
_TITLES |= {413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}
_TITLES |= {503: "Service Unavailable"}


def problem_body(
    status: int, detail: str, *, instance: str, title: str | None = None, extra: dict[str, Any] | None = None
) -> bytes:
    """The JSON of an RFC 9457 problem."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": instance,
        "error": detail,  # Open Inference Protocol's error field
    }
    body.update(extra or {})
    return msgspec.json.encode(body)


def problem_response(
    status: int,
    detail: str,
    *,
    instance: str,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    media_type: str = PROBLEM_JSON,
) -> Response[bytes]:
    """An RFC 9457 problem response."""
    body = problem_body(status, detail, instance=instance, title=title, extra=extra)
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def problem_media(accept: str | None) -> str:
    """The media type of a function's problem body for a client with this Accept header."""
    return PROBLEM_JSON if accept and PROBLEM_JSON in accept.lower() else JSON


def known_problem(exc: Exception, path: str) -> tuple[int, bytes] | None:
    """Status and problem JSON for the functions' own errors; None for anything else."""
    if isinstance(exc, FunctionError):
        body = problem_body(exc.status_code, exc.detail, instance=path, title=exc.title, extra=exc.extra)
        return exc.status_code, body
    if isinstance(exc, ProtocolError | ContractError):
        return 400, problem_body(400, str(exc), instance=path)
    undecodable = body_problem(exc)
    if undecodable is not None:
        return 400, problem_body(400, undecodable, instance=path)
    return None


def body_problem(exc: BaseException) -> str | None:
    """What is wrong with a request body that failed to decode in a way no validator reports
    (msgspec and the JSON readers raise these while parsing): None for any other exception."""
    if isinstance(exc, RecursionError):
        return "the JSON body is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    return None


def validation_detail(exc: HTTPException) -> str:
    """Litestar's "Validation failed for POST /x" plus what failed: "text: Expected `str`, got `int`"."""
    items = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in items:
        if isinstance(item, dict):
            key = item.get("key")
            msg = str(item.get("message", item))
            parts.append(f"{key}: {msg}" if key and key != "data" else msg)
        else:
            parts.append(str(item))
    return "; ".join(parts) or str(exc.detail)


def problem_details_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar exception handler for every exception type (register it for `Exception`)."""
    path = request.scope.get("path", "")
    media = problem_media(request.headers.get("accept"))
    known = known_problem(exc, path)
    if known is not None:
        return Response(known[1], status_code=known[0], media_type=media)
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        status = exc.status_code
        template = _HTTP_DETAILS.get(status)
        detail = template.format(method=request.method, path=path) if template else validation_detail(exc)
        extra = {"errors": exc.extra} if status == 400 and exc.extra else None
        return problem_response(
            status, detail, instance=path, extra=extra, headers=exc.headers, media_type=media
        )
    if isinstance(exc, HTTPException) and exc.status_code == 503:
        return problem_response(503, exc.detail, instance=path, headers=exc.headers, media_type=media)
    return Response(unexpected_problem(request.method, path), status_code=500, media_type=media)


def unexpected_problem(method: str, path: str) -> bytes:
    """For the exception being handled: log its traceback here, answer without internals."""
    logger.exception("unhandled error on %s %s", method, path)
    return problem_body(500, "internal error; the traceback is in the service log", instance=path)
