"""Open Inference Protocol v2 (KServe / Triton REST) tensor codec: the only module that knows bytes.

JSON tensors and the binary tensor extension (a JSON header of `Inference-Header-Content-Length`
bytes followed by raw little-endian tensor data), for requests and responses, in both directions.
Over 300 lines on purpose: encode and decode of both directions share the datatype table and the
validation rules, and every byte-level check lives here so no other module parses tensor data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

HEADER = "Inference-Header-Content-Length"

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


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary_data: bool = False


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def binary_output_names(self, available: Iterable[str]) -> set[str]:
        """Outputs to send as binary: those asked per output, else all when `binary_data_output`."""
        if self.outputs:
            return {o.name for o in self.outputs if o.binary_data}
        return set(available) if self.parameters.get("binary_data_output") is True else set()


@dataclass(slots=True)
class InferResponse:
    model_name: str
    id: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name of an array's dtype (byte order ignored)."""
    name = _OIP_BY_DTYPE.get(array.dtype.newbyteorder("<"))
    if name is None:
        raise ProtocolError(
            f"numpy dtype {array.dtype} has no Open Inference Protocol datatype; "
            f"supported: {', '.join(DATATYPES)}"
        )
    return name


# ---------------------------------------------------------------------------------------- decode


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an infer request body; `header_length` is the `Inference-Header-Content-Length`."""
    header, end = _split(body, header_length)
    inputs = _decode_tensors(_field(header, "inputs", list, "request"), "input", body, end)
    outputs = []
    for i, entry in enumerate(_optional(header, "outputs", list, "request") or []):
        where = f"outputs[{i}]"
        _require(entry, dict, where)
        params = _optional(entry, "parameters", dict, where) or {}
        binary = params.get("binary_data", False)
        _require(binary, bool, f"{where}.parameters.binary_data")
        outputs.append(RequestedOutput(_field(entry, "name", str, where), binary))
    return InferRequest(
        id=_optional(header, "id", str, "request"),
        inputs=inputs,
        outputs=outputs,
        parameters=_optional(header, "parameters", dict, "request") or {},
    )


def decode_response(body: bytes, header_length: int | None) -> InferResponse:
    """Parse an infer response body (the client side of `encode_response`)."""
    header, end = _split(body, header_length)
    if "error" in header:
        raise ProtocolError(f"the server answered an error: {header['error']!r}")
    return InferResponse(
        model_name=_field(header, "model_name", str, "response"),
        id=_optional(header, "id", str, "response"),
        outputs=_decode_tensors(_field(header, "outputs", list, "response"), "output", body, end),
        parameters=_optional(header, "parameters", dict, "response") or {},
        model_version=_optional(header, "model_version", str, "response"),
    )


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], int]:
    if header_length is None:
        header_length = len(body)
    elif isinstance(header_length, bool) or not isinstance(header_length, int):
        raise ProtocolError(f"{HEADER} must be an integer, got {header_length!r}")
    elif not 0 <= header_length <= len(body):
        raise ProtocolError(
            f"{HEADER} is {header_length} but the body has {len(body)} bytes; "
            "it must be between 0 and the body length"
        )
    try:
        header = msgspec.json.decode(body[:header_length])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the JSON header is not valid JSON: {exc}") from None
    _require(header, dict, "the JSON header")
    return header, header_length


def _decode_tensors(entries: list[Any], kind: str, body: bytes, offset: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        _require(entry, dict, f"{kind}s[{i}]")
        name = _field(entry, "name", str, f"{kind}s[{i}]")
        where = f"{kind} {name!r}"
        if name in tensors:
            raise ProtocolError(f"{where} appears twice; tensor names must be unique")
        datatype = _field(entry, "datatype", str, where)
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            hint = " (BYTES tensors are not supported)" if datatype == "BYTES" else ""
            raise ProtocolError(
                f"{where} has datatype {datatype!r}{hint}; expected one of {', '.join(DATATYPES)}"
            )
        shape = _shape(_field(entry, "shape", list, where), where)
        count = math.prod(shape)
        params = _optional(entry, "parameters", dict, where) or {}
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in entry:
                raise ProtocolError(f"{where} has neither 'data' nor parameters.binary_data_size")
            tensors[name] = _from_json(entry["data"], dtype, shape, count, where)
            continue
        if "data" in entry:
            raise ProtocolError(f"{where} has both 'data' and parameters.binary_data_size")
        _require(size, int, f"{where} parameters.binary_data_size")
        if size != count * dtype.itemsize:
            raise ProtocolError(
                f"{where} has binary_data_size {size} but shape {shape} of {datatype} "
                f"needs {count * dtype.itemsize} bytes"
            )
        if offset + size > len(body):
            raise ProtocolError(
                f"body truncated: {where} needs {size} bytes at offset {offset} "
                f"but the body has {len(body)} bytes"
            )
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        array = array.reshape(tuple(shape))  # a list [] would mean 'no change', not a scalar
        if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
            raise ProtocolError(f"{where} is BOOL but holds bytes other than 0 and 1")
        tensors[name] = array
        offset += size
    if offset != len(body):
        raise ProtocolError(
            f"{len(body) - offset} unexpected bytes after the last binary tensor: the "
            f"binary_data_size values must add up to the body length minus {HEADER}"
        )
    return tensors


def _shape(shape: list[Any], where: str) -> list[int]:
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"{where} has {len(shape)} dimensions; at most {MAX_DIMS} allowed")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ProtocolError(f"{where} has shape {shape}; dimensions must be integers >= 0")
    # each dimension too: [2**63 - 1, 0] has no elements but no array can have that shape
    if math.prod(shape) > MAX_ELEMENTS or any(dim > MAX_ELEMENTS for dim in shape):
        raise ProtocolError(f"{where} has shape {shape}: more than {MAX_ELEMENTS} elements or per dimension")
    return shape


def _from_json(data: Any, dtype: np.dtype[Any], shape: list[int], count: int, where: str) -> Any:
    flat = _flatten(data, shape, where)
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


def _flatten(data: Any, shape: list[int], where: str) -> list[Any]:
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


def _require(value: Any, kind: type, where: str) -> None:
    # bool is an int subclass: never accept true where a number is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where} must be {kind.__name__}, got {type(value).__name__}")


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{where} is missing the field {key!r}")
    _require(obj[key], kind, f"{where} field {key!r}")
    return obj[key]


def _optional(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    return None if obj.get(key) is None else _field(obj, key, kind, where)


# ---------------------------------------------------------------------------------------- encode


def encode_response(
    model_name: str,
    outputs: dict[str, np.ndarray],
    *,
    binary: set[str] | bool,
    request_id: str | None,
    model_version: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Body and JSON header length (None when no output is binary, the body is then pure JSON)."""
    names = set(outputs) if binary is True else set() if binary is False else binary
    unknown = names - set(outputs)
    if unknown:
        raise ValueError(f"binary outputs {sorted(unknown)} are not among {sorted(outputs)}")
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    header["outputs"], chunks = _encode_tensors(outputs, names)
    return _join(header, chunks)


def encode_request(
    inputs: dict[str, np.ndarray],
    *,
    outputs: list[str] | None = None,
    binary_outputs: bool = True,
    parameters: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, int]:
    """Body and JSON header length of an infer request; inputs always travel as binary."""
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    params = dict(parameters or {})
    if outputs is None and binary_outputs:
        params["binary_data_output"] = True
    if params:
        header["parameters"] = params
    header["inputs"], chunks = _encode_tensors(inputs, set(inputs))
    if outputs is not None:
        header["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_outputs}} for name in outputs
        ]
    body, length = _join(header, chunks)
    return body, length if length is not None else len(body)


def _encode_tensors(
    tensors: dict[str, np.ndarray], binary: set[str]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in tensors.items():
        array = np.asarray(array)
        datatype = datatype_of(array)
        # Little-endian, C order; not ascontiguousarray, which turns a 0-d scalar into shape (1,).
        array = np.require(array, dtype=DATATYPES[datatype], requirements="C")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            data = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    return entries, chunks


def _join(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, int | None]:
    encoded = msgspec.json.encode(header)
    if not chunks:
        return encoded, None
    return b"".join([encoded, *chunks]), len(encoded)
