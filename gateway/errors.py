"""The gateway's exception tree; every downstream failure is converted at one boundary
(gateway/clients.py) into one of these.

    GatewayError (500)
    ├── InvalidRequestError (400)   bad parameters, named
    ├── NotFoundError (404)         unknown model
    ├── OverloadedError (429)       queue full; carries Retry-After
    ├── StageError (502)            a stage answered something unusable
    │   ├── StageUnavailableError (503)  no ready replica / refused connections
    │   └── StageTimeoutError (504)
    └── CancelledError (499)        the client went away (never sent, only counted)
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    status_code: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"

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


class NotFoundError(GatewayError):
    status_code = 404
    openai_type = "invalid_request_error"


class OverloadedError(GatewayError):
    status_code = 429
    openai_type = "rate_limit_error"


class StageError(GatewayError):
    status_code = 502


class StageUnavailableError(StageError):
    status_code = 503


class StageTimeoutError(StageError):
    status_code = 504


class CancelledError(GatewayError):
    status_code = 499
