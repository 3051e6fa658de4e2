"""Request bodies decoded strictly: Litestar validates a JSON body in lax mode (the string "5"
passes as an integer, 1 as a boolean), so the routes decode the same bytes again with msgspec's
strict rules and answer a 400 that names the field. The handlers keep their typed `data` parameter
for the OpenAPI schema; the extra decode costs microseconds against a generation's milliseconds."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request

from gateway.errors import InvalidRequestError

T = TypeVar("T")
_PATH = re.compile(r"at `\$\.([A-Za-z_][\w.]*)")


async def decode_strict(request: Request[Any, Any, Any], kind: type[T]) -> T:
    """The body as `kind`, with no type coercion; a ValidationError names the field as `param`."""
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except msgspec.ValidationError as e:
        m = _PATH.search(str(e))
        raise InvalidRequestError(f"invalid request body: {e}", param=m.group(1) if m else None) from None
    except msgspec.DecodeError as e:  # Litestar has parsed it already; kept for direct callers
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None


async def unknown_fields(request: Request[Any, Any, Any], known: frozenset[str]) -> list[str]:
    """The body's top-level keys that are not in `known` (sorted)."""
    keys = msgspec.json.decode(await request.body(), type=dict[str, msgspec.Raw])
    return sorted(set(keys) - known)
