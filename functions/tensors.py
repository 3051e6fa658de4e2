"""Open Inference Protocol v2 tensor data, below the message framing (functions.protocol): the
datatype table, the bounds on shapes, and the checks on JSON `data` values. With functions.protocol,
the only modules that know how tensors look on the wire; nothing else parses tensor data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_OIP_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}

# Limits that stop a hostile header from asking for a giant allocation before any check.
MAX_DIMS = 8
MAX_ELEMENTS = 2**28


class ProtocolError(Exception):
    """The request or response content breaks the protocol (the HTTP layer answers 400)."""


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name of an array's dtype (byte order ignored)."""
    name = _OIP_BY_DTYPE.get(array.dtype.newbyteorder("<"))
    if name is None:
        raise ProtocolError(
            f"numpy dtype {array.dtype} has no Open Inference Protocol datatype; "
            f"supported: {', '.join(DATATYPES)}"
        )
    return name


def check_shape(shape: list[Any], where: str) -> list[int]:
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"{where} has {len(shape)} dimensions; at most {MAX_DIMS} allowed")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ProtocolError(f"{where} has shape {shape}; dimensions must be integers >= 0")
    # each dimension too: [2**63 - 1, 0] has no elements but no array can have that shape
    if math.prod(shape) > MAX_ELEMENTS or any(dim > MAX_ELEMENTS for dim in shape):
        raise ProtocolError(f"{where} has shape {shape}: more than {MAX_ELEMENTS} elements or per dimension")
    return shape


def from_json(data: Any, dtype: np.dtype[Any], shape: list[int], count: int, where: str) -> Any:
    flat = flatten(data, shape, where)
    if len(flat) != count:
        raise ProtocolError(f"{where} has {len(flat)} elements in 'data' but shape {shape} needs {count}")
    # Check Python types exactly: a bool in an FP32 tensor or a float in an INT64 tensor is a
    # client bug worth reporting, not silently converting (and bool is an int subclass).
    allowed, expected = _JSON_TYPES[dtype.kind]
    if not all(type(x) in allowed for x in flat):
        raise ProtocolError(f"{where} is {_OIP_BY_DTYPE[dtype]}: 'data' must hold {expected} only")
    if not flat:
        return np.zeros(tuple(shape), dtype=dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if min(flat) < info.min or max(flat) > info.max:
            raise ProtocolError(f"{where} 'data' holds values outside the range of {dtype.name}")
    elif dtype.kind == "f":
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:  # a JSON integer beyond any float (2**1024 and up)
            wide = np.array([math.inf])
        if np.abs(wide).max() > np.finfo(dtype).max:
            raise ProtocolError(f"{where} 'data' holds values too large for {dtype.name}")
    return np.array(flat, dtype=dtype).reshape(tuple(shape))


_JSON_TYPES: dict[str, tuple[set[type], str]] = {
    "b": ({bool}, "true/false"),
    "u": ({int}, "integers"),
    "i": ({int}, "integers"),
    "f": ({int, float}, "numbers"),
}


def flatten(data: Any, shape: list[int], where: str) -> list[Any]:
    """A flat list stays as is; a nested one must mirror `shape` exactly."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where} 'data' must be a (flat or nested) list, got {type(data).__name__}")
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []

    def walk(node: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise ProtocolError(f"{where} 'data' is nested deeper than shape {shape}")
            flat.append(node)
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise ProtocolError(f"{where} nested 'data' does not match shape {shape}")
        for item in node:
            walk(item, depth + 1)

    walk(data, 0)
    return flat


def require(value: Any, kind: type, where: str) -> None:
    # bool is an int subclass: never accept true where a number is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where} must be {kind.__name__}, got {type(value).__name__}")
