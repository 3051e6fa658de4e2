"""The OIP v2 codec: round trips for every datatype and form, and hostile bodies -> ProtocolError."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from functions.protocol import (
    DATATYPES,
    HEADER,
    MAX_ELEMENTS,
    ProtocolError,
    RequestedOutput,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def json_request(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_binary_request_round_trip(datatype: str) -> None:
    tensors = {"a": sample(datatype), "b": sample(datatype, (0, 4)), "c": sample(datatype, ())}
    body, length = encode_request(tensors, outputs=["y"], request_id="r1", parameters={"k": 1})
    request = decode_request(body, length)
    assert request.id == "r1"
    assert request.parameters == {"k": 1}
    assert request.outputs == [RequestedOutput("y", True)]
    assert list(request.inputs) == ["a", "b", "c"]
    for name, array in tensors.items():
        got = request.inputs[name]
        assert got.dtype == DATATYPES[datatype] and got.shape == array.shape
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_json_request_round_trip(datatype: str) -> None:
    array = sample(datatype)
    nested = {"name": "x", "shape": [2, 3], "datatype": datatype, "data": array.tolist()}
    flat = {**nested, "name": "y", "data": array.ravel().tolist()}
    request = decode_request(json_request([nested, flat]), None)
    for name in ("x", "y"):
        assert request.inputs[name].dtype == DATATYPES[datatype]
        np.testing.assert_array_equal(request.inputs[name], array)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False, {"b"}])
def test_response_round_trip(datatype: str, binary: bool | set[str]) -> None:
    outputs = {"a": sample(datatype), "b": sample(datatype, (1, 5))}
    body, length = encode_response("stage1", outputs, binary=binary, request_id="7")
    assert (length is None) == (binary is False)
    response = decode_response(body, length)
    assert (response.model_name, response.id) == ("stage1", "7")
    for name, array in outputs.items():
        assert response.outputs[name].dtype == DATATYPES[datatype]
        np.testing.assert_array_equal(response.outputs[name], array)


def test_big_endian_and_non_contiguous_inputs_are_normalized() -> None:
    array = np.arange(12, dtype=">i8").reshape(3, 4).T
    body, length = encode_request({"x": array})
    np.testing.assert_array_equal(decode_request(body, length).inputs["x"], array)


def test_binary_data_output_parameter() -> None:
    body, length = encode_request({"x": np.zeros(2, np.float32)})
    request = decode_request(body, length)
    assert request.binary_output_names(["y", "z"]) == {"y", "z"}
    plain = decode_request(json_request([]), None)
    assert plain.binary_output_names(["y"]) == set()


def test_an_output_s_binary_data_wins_over_the_request_s_binary_data_output() -> None:
    """As Triton reads them: an output's own `binary_data`, else the request's `binary_data_output`."""
    outputs = [
        {"name": "a"},
        {"name": "b", "parameters": {"binary_data": False}},
        {"name": "c", "parameters": {"binary_data": True}},
    ]
    both = decode_request(json_request([], outputs=outputs, parameters={"binary_data_output": True}), None)
    assert both.output_names() == ["a", "b", "c"]
    assert both.binary_output_names(["a", "b", "c"]) == {"a", "c"}
    per_output = decode_request(json_request([], outputs=outputs), None)
    assert per_output.binary_output_names(["a", "b", "c"]) == {"c"}
    assert decode_request(json_request([], outputs=[]), None).output_names() is None


def test_binary_encoding_is_fast() -> None:
    hidden = np.random.default_rng(0).standard_normal((1, 1, 768)).astype(np.float32)  # 3 KB
    start = time.perf_counter()
    for _ in range(200):
        body, length = encode_request({"hidden_states": hidden})
        decode_request(body, length)
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 1e-3, f"encode+decode took {per_call * 1e6:.0f} us; expected microseconds"


def binary_body() -> tuple[bytes, int]:
    return encode_request({"x": np.arange(6, dtype=np.int64).reshape(2, 3)})


def entry(**overrides) -> dict:
    return {"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2], **overrides}


BAD_JSON_REQUESTS = {
    "not json": b"{nope",
    "not utf-8": b'{"inputs": "\xff\xfe"}',
    "not an object": b"[1, 2]",
    "no inputs": b"{}",
    "inputs not a list": b'{"inputs": {}}',
    "input not an object": json_request([1]),
    "missing name": json_request([{k: v for k, v in entry().items() if k != "name"}]),
    "missing shape": json_request([{k: v for k, v in entry().items() if k != "shape"}]),
    "missing data": json_request([{k: v for k, v in entry().items() if k != "data"}]),
    "unknown datatype": json_request([entry(datatype="FP8")]),
    "bytes datatype": json_request([entry(datatype="BYTES")]),
    "negative dim": json_request([entry(shape=[-2])]),
    "bool dim": json_request([entry(shape=[True, 2])]),
    "float dim": json_request([entry(shape=[2.0])]),
    "too many dims": json_request([entry(shape=[1] * 9, data=[1])]),
    "too many elements": json_request([entry(shape=[MAX_ELEMENTS, 2])]),
    "count mismatch": json_request([entry(shape=[3])]),
    "duplicate name": json_request([entry(), entry()]),
    "float in int tensor": json_request([entry(data=[1.5, 2])]),
    "bool in float tensor": json_request([entry(datatype="FP32", data=[True, 1.0])]),
    "string in data": json_request([entry(data=["1", 2])]),
    "object in data": json_request([entry(data=[{}, 2])]),
    "data not a list": json_request([entry(data=5)]),
    "out of range": json_request([entry(datatype="UINT8", data=[1, 256])]),
    "huge int": json_request([entry(data=[2**70, 1])]),
    "fp16 overflow": json_request([entry(datatype="FP16", data=[1e6, 1])]),
    # found by tests/fuzz: an integer beyond float64 was an OverflowError (a 500), not a 400
    "int beyond float64 in fp32": json_request([entry(datatype="FP32", data=[2**1024, 1])]),
    "int beyond float64 in fp64": json_request([entry(datatype="FP64", data=[1, -(10**400)])]),
    "ragged nested": json_request([entry(shape=[2, 2], data=[[1, 2], [3, [4]]])]),
    "binary without header": json_request(
        [{**entry(), "parameters": {"binary_data_size": 16}, "data": None}]
    ),
    "outputs not a list": json_request([entry()], outputs={}),
    "binary_data not bool": json_request(
        [entry()], outputs=[{"name": "y", "parameters": {"binary_data": 1}}]
    ),
    "id not a string": json_request([entry()], id=5),
    "output asked twice": json_request([entry()], outputs=[{"name": "y"}, {"name": "y"}]),
    "binary_data_output not bool": json_request([entry()], parameters={"binary_data_output": "yes"}),
}


@pytest.mark.parametrize("body", BAD_JSON_REQUESTS.values(), ids=BAD_JSON_REQUESTS.keys())
def test_bad_json_requests(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(body, None)


def test_errors_name_the_tensor_and_the_expectation() -> None:
    with pytest.raises(ProtocolError, match=r"input 'x' has 2 elements .* shape \[3\] needs 3"):
        decode_request(json_request([entry(shape=[3])]), None)


def test_truncated_and_extra_binary_bytes() -> None:
    body, length = binary_body()
    with pytest.raises(ProtocolError, match="truncated"):
        decode_request(body[:-1], length)
    with pytest.raises(ProtocolError, match="unexpected bytes"):
        decode_request(body + b"\0", length)
    with pytest.raises(ProtocolError, match=HEADER):
        decode_request(body, len(body) + 1)
    with pytest.raises(ProtocolError, match=HEADER):
        decode_request(body, -1)
    with pytest.raises(ProtocolError):
        decode_request(body, length - 1)  # header cut mid-JSON


def test_binary_size_must_match_shape() -> None:
    header = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}
    header["inputs"][0]["parameters"] = {"binary_data_size": 4}
    raw = json.dumps(header).encode()
    with pytest.raises(ProtocolError, match="needs 8 bytes"):
        decode_request(raw + b"\0" * 4, len(raw))


def test_binary_bool_must_be_zero_or_one() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "m",
                    "shape": [2],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 2},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="BOOL"):
        decode_request(header + b"\x01\x07", len(header))


def test_server_error_body_is_reported() -> None:
    with pytest.raises(ProtocolError, match="boom"):
        decode_response(b'{"error": "boom"}', None)


def test_random_bytes_only_raise_protocol_error() -> None:
    rng = random.Random(1234)
    valid, length = binary_body()
    for case in range(600):
        if case % 3 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
            header_length = rng.choice([None, rng.randrange(-2, len(body) + 3)])
        else:  # mutate a valid body so the JSON often still parses
            body = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
            header_length = rng.choice([length, None, rng.randrange(len(body) + 1)])
        try:
            decode_request(body, header_length)
            decode_response(body, header_length)
        except ProtocolError:
            pass
