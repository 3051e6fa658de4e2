"""Request bodies decoded strictly: Litestar validates a JSON body in lax mode (the string "5"
passes as an integer, 1 as a boolean), so the routes decode the same bytes again with msgspec's
strict rules (one decode, then a strict conversion) and answer a 400 that names the field. The handlers keep their typed `data` parameter
for the OpenAPI schema; the extra decode costs microseconds against a generation's milliseconds."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request

from gateway.errors import InvalidRequestError

T = TypeVar("T")
_PATH = re.compile(r"at `\$\.([A-Za-z_][\w.]*)")


async def decode_strict(request: Request[Any, Any, Any], kind: type[T]) -> tuple[T, list[str]]:
    """The body as `kind`, with no type coercion (a ValidationError names the field as `param`),
    and the body's top-level keys `kind` does not know (sorted; for structs that allow them)."""
    try:
        raw = msgspec.json.decode(await request.body())
        data = msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as e:
        m = _PATH.search(str(e))
        raise InvalidRequestError(f"invalid request body: {e}", param=m.group(1) if m else None) from None
    except msgspec.DecodeError as e:  # Litestar has parsed it already; kept for direct callers
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    fields = getattr(kind, "__struct_fields__", ())
    return data, sorted(set(raw) - set(fields)) if isinstance(raw, dict) else []
