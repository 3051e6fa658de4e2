"""Open Inference Protocol v2 (KServe / Triton REST) message codec: with functions.tensors (the
datatype table and the checks on tensor data), the only modules that know bytes.

JSON tensors and the binary tensor extension (a JSON header of `Inference-Header-Content-Length`
bytes followed by raw little-endian tensor data), for requests and responses, in both directions.
Which outputs travel as binary: an output's own `binary_data` parameter, else the request's
`binary_data_output` (as Triton reads them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from functions.tensors import (
    DATATYPES,
    MAX_DIMS,
    MAX_ELEMENTS,
    ProtocolError,
    check_shape,
    datatype_of,
    from_json,
    require,
)

__all__ = [
    "DATATYPES",
    "HEADER",
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "InferRequest",
    "InferResponse",
    "ProtocolError",
    "RequestedOutput",
    "datatype_of",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

HEADER = "Inference-Header-Content-Length"
BINARY_OUTPUT = "binary_data_output"  # request parameter: every output binary unless it says otherwise
BINARY = "binary_data"  # requested output parameter


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary_data: bool | None = None  # None: as the request's binary_data_output says


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def output_names(self) -> list[str] | None:
        """The outputs asked for, or None when the request names none."""
        return [o.name for o in self.outputs] or None

    def binary_output_names(self, available: Iterable[str]) -> set[str]:
        """Outputs to send as binary: each asked output as its `binary_data` says, else as the
        request's `binary_data_output` says (then all of `available` when none is named)."""
        default = self.parameters.get(BINARY_OUTPUT) is True
        if self.outputs:
            return {o.name for o in self.outputs if (default if o.binary_data is None else o.binary_data)}
        return set(available) if default else set()


@dataclass(slots=True)
class InferResponse:
    model_name: str
    id: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None


# ---------------------------------------------------------------------------------------- decode


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an infer request body; `header_length` is the `Inference-Header-Content-Length`."""
    header, end = _split(body, header_length)
    inputs = _decode_tensors(_field(header, "inputs", list, "request"), "input", body, end)
    parameters = _optional(header, "parameters", dict, "request") or {}
    if parameters.get(BINARY_OUTPUT) is not None:
        require(parameters[BINARY_OUTPUT], bool, f"request parameters.{BINARY_OUTPUT}")
    return InferRequest(
        id=_optional(header, "id", str, "request"),
        inputs=inputs,
        outputs=_requested_outputs(_optional(header, "outputs", list, "request") or []),
        parameters=parameters,
    )


def _requested_outputs(entries: list[Any]) -> list[RequestedOutput]:
    outputs: list[RequestedOutput] = []
    for i, entry in enumerate(entries):
        where = f"outputs[{i}]"
        require(entry, dict, where)
        name = _field(entry, "name", str, where)
        if any(o.name == name for o in outputs):
            raise ProtocolError(f"output {name!r} is asked for twice; output names must be unique")
        params = _optional(entry, "parameters", dict, where) or {}
        binary = params.get(BINARY)
        if binary is not None:
            require(binary, bool, f"{where}.parameters.{BINARY}")
        outputs.append(RequestedOutput(name, binary))
    return outputs


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
    require(header, dict, "the JSON header")
    return header, header_length


def _decode_tensors(entries: list[Any], kind: str, body: bytes, offset: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        require(entry, dict, f"{kind}s[{i}]")
        name = _field(entry, "name", str, f"{kind}s[{i}]")
        where = f"{kind} {name!r}"
        if name in tensors:
            raise ProtocolError(f"{where} appears twice; tensor names must be unique")
        tensors[name], offset = _decode_tensor(entry, where, body, offset)
    if offset != len(body):
        raise ProtocolError(
            f"{len(body) - offset} unexpected bytes after the last binary tensor: the "
            f"binary_data_size values must add up to the body length minus {HEADER}"
        )
    return tensors


def _decode_tensor(entry: dict[str, Any], where: str, body: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One tensor, from its JSON `data` or from the binary part at `offset`; and the next offset."""
    datatype = _field(entry, "datatype", str, where)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        hint = " (BYTES tensors are not supported)" if datatype == "BYTES" else ""
        raise ProtocolError(
            f"{where} has datatype {datatype!r}{hint}; expected one of {', '.join(DATATYPES)}"
        )
    shape = check_shape(_field(entry, "shape", list, where), where)
    count = math.prod(shape)
    params = _optional(entry, "parameters", dict, where) or {}
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise ProtocolError(f"{where} has neither 'data' nor parameters.binary_data_size")
        return from_json(entry["data"], dtype, shape, count, where), offset
    if "data" in entry:
        raise ProtocolError(f"{where} has both 'data' and parameters.binary_data_size")
    require(size, int, f"{where} parameters.binary_data_size")
    if size != count * dtype.itemsize:
        raise ProtocolError(
            f"{where} has binary_data_size {size} but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize} bytes"
        )
    if offset + size > len(body):
        raise ProtocolError(
            f"body truncated: {where} needs {size} bytes at offset {offset} but the body has {len(body)} bytes"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    array = array.reshape(tuple(shape))  # a list [] would mean 'no change', not a scalar
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise ProtocolError(f"{where} is BOOL but holds bytes other than 0 and 1")
    return array, offset + size


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{where} is missing the field {key!r}")
    require(obj[key], kind, f"{where} field {key!r}")
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
        params[BINARY_OUTPUT] = True
    if params:
        header["parameters"] = params
    header["inputs"], chunks = _encode_tensors(inputs, set(inputs))
    if outputs is not None:
        header["outputs"] = [{"name": name, "parameters": {BINARY: binary_outputs}} for name in outputs]
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
