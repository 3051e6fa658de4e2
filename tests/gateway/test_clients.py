"""The one boundary where downstream failures become gateway errors (gateway/clients.py): every way a
stage or the tokenizer can fail maps to a GatewayError with a status a client can act on (a 409 to
the replay signal), and nothing else escapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from functions import contract as c
from functions import protocol
from gateway.clients import Answer, Clients, StageConflict, StageRejected
from gateway.config import Node, parse_config
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
    StageError,
    StageTimeoutError,
    StageUnavailableError,
)

NODE = Node("n1", "127.0.0.1:9", 0)
INPUTS = {c.SEQUENCE_IDS: np.array([1]), c.PAST_LENGTHS: np.array([0]), c.INPUT_IDS: np.array([[1, 2]])}


class FakePoster:
    def __init__(self, answer: Callable[[], Answer]):
        self.answer, self.calls = answer, 0

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        self.calls += 1
        return self.answer()

    async def aclose(self) -> None:
        pass


def _raise(exc: BaseException) -> Callable[[], Answer]:
    def answer() -> Answer:
        raise exc

    return answer


def _status(
    status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> Callable[[], Answer]:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return lambda: (status, headers or {}, raw)


def _ok_answer() -> Answer:
    body, hlen = protocol.encode_response(
        "stage-1", {"hidden_states_2": np.zeros((1, 2, 4), np.float32)}, binary=True, request_id=None
    )
    return 200, {protocol.HEADER.lower(): str(hlen)}, body


def clients(poster: FakePoster | None = None, transport: httpx.AsyncBaseTransport | None = None) -> Clients:
    cfg = parse_config(
        {
            "model_name": "m",
            "tokenizer": {"address": "tok:1"},
            "nodes": [{"id": "n1", "address": "127.0.0.1:9", "model_part": 0}],
            "retries": 2,
            "backoff": 0.0,
        },
        env={},
    )
    return Clients(cfg, transport, poster)


STAGE_FAILURES: list[tuple[str, Callable[[], Answer], type[BaseException], str]] = [
    ("refused", _raise(ConnectionRefusedError("refused")), StageUnavailableError, "is it running"),
    ("reset", _raise(ConnectionResetError("reset")), StageUnavailableError, "dropped the connection"),
    ("httpx-connect", _raise(httpx.ConnectError("no")), StageUnavailableError, "refused"),
    ("timeout", _raise(TimeoutError()), StageTimeoutError, "within its timeout"),
    ("httpx-timeout", _raise(httpx.ReadTimeout("slow")), StageTimeoutError, "within its timeout"),
    ("garbage-200", _status(200, b"\x00\x01not json"), StageError, "unreadable answer"),
    (
        "bad-header-length",
        lambda: (200, {protocol.HEADER.lower(): "abc"}, b"{}"),
        StageError,
        "unreadable answer",
    ),
    ("error-in-200", _status(200, {"error": "boom"}), StageError, "unreadable answer"),
    ("unreadable-409", _status(409, {"detail": "x"}), StageError, "unreadable 409"),
    ("409-not-json", _status(409, b"<html>"), StageError, "unreadable 409"),
    ("400", _status(400, {"detail": "bad batch"}), StageRejected, "bad batch"),
    ("413", _status(413, {"detail": "too big"}), StageRejected, "too big"),
    ("503", _status(503, {"detail": "loading"}), StageUnavailableError, "loading"),
    ("500", _status(500, {"detail": "internal"}), StageError, "failed (500)"),
    ("502-html", _status(502, b"<html>proxy</html>"), StageError, "proxy"),
]


@pytest.mark.parametrize(
    ("answer", "kind", "words"), [f[1:] for f in STAGE_FAILURES], ids=[f[0] for f in STAGE_FAILURES]
)
def test_every_stage_failure_is_a_gateway_error(answer: Callable[[], Answer], kind: type, words: str) -> None:
    poster = FakePoster(answer)

    async def go() -> None:
        cl = clients(poster)
        try:
            await cl.infer(NODE, "stage-1", INPUTS, ["hidden_states_2"])
        finally:
            await cl.aclose()

    with pytest.raises(GatewayError) as info:
        asyncio.run(go())
    assert type(info.value) is kind, info.value
    assert words in info.value.message, info.value.message
    transport_error = isinstance(info.value, StageUnavailableError) and "running" in info.value.message
    # connection failures are retried (bounded), anything the stage answered is not
    assert poster.calls == (3 if transport_error or "dropped" in info.value.message else 1)


def test_a_409_is_the_replay_signal_with_the_held_lengths() -> None:
    body = {"status": 409, c.SEQUENCE_IDS: [7, 9], c.HELD_LENGTHS: [3, 0], c.PAST_LENGTHS: [5, 5]}

    async def go() -> None:
        cl = clients(FakePoster(_status(409, body)))
        await cl.infer(NODE, "stage-1", INPUTS, ["hidden_states_2"])

    with pytest.raises(StageConflict) as info:
        asyncio.run(go())
    assert info.value.held == {7: 3, 9: 0}


def test_a_good_answer_decodes() -> None:
    async def go() -> dict[str, np.ndarray]:
        return await clients(FakePoster(_ok_answer)).infer(NODE, "stage-1", INPUTS, ["hidden_states_2"])

    assert asyncio.run(go())["hidden_states_2"].shape == (1, 2, 4)


def _tokenizer(status: int, body: Any) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body if isinstance(body, bytes) else json.dumps(body).encode())

    return httpx.MockTransport(handler)


TOKENIZER_FAILURES: list[tuple[str, int, Any, type[GatewayError]]] = [
    ("too-long", 400, {"detail": "text is longer than 1000000 characters"}, InvalidRequestError),
    ("body-too-big", 413, {"detail": "too large"}, PayloadTooLargeError),
    ("not-ready", 503, {"detail": "loading"}, StageUnavailableError),
    ("crashed", 500, {"detail": "internal"}, StageError),
    ("garbage", 200, b"not json", StageError),
    ("wrong-shape", 200, {"ids": [1, 2]}, StageError),
    ("missing-ids", 200, {"count": 2}, StageError),
]


@pytest.mark.parametrize(
    ("status", "body", "kind"), [f[1:] for f in TOKENIZER_FAILURES], ids=[f[0] for f in TOKENIZER_FAILURES]
)
def test_every_tokenizer_failure_is_a_gateway_error(status: int, body: Any, kind: type) -> None:
    async def go() -> None:
        await clients(transport=_tokenizer(status, body)).encode(["hello"])

    with pytest.raises(GatewayError) as info:
        asyncio.run(go())
    assert type(info.value) is kind
    assert info.value.message


def test_a_stage_rejection_is_a_stage_error_not_a_client_error() -> None:
    # a 4xx from a stage is the gateway's own fault (or a bound): the client sees 502, not 400
    assert issubclass(StageRejected, StageError) and StageRejected.status_code == 502


def test_server_timing_header_is_read_leniently() -> None:
    from gateway.clients import server_seconds

    assert server_seconds("infer;dur=1.500") == 0.0015
    assert server_seconds("infer;desc=x;dur=2, other;dur=9") == 0.002
    assert server_seconds(None) is None and server_seconds("infer") is None
    assert server_seconds("infer;dur=abc") is None


def _counting(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[httpx.MockTransport, list[str]]:
    seen: list[str] = []

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return handler(request)

    return httpx.MockTransport(wrapped), seen


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=request)


def test_control_calls_go_through_the_retrying_face() -> None:
    """The model metadata and the KV listing map failures at the one boundary: a refused metadata
    call is retried (the configured 2 retries) then StageUnavailableError; the listing is asked
    once (a polling caller asks again) and reads the stage's body type (functions.stage_api)."""
    transport, seen = _counting(_refuse)
    with pytest.raises(StageUnavailableError) as info:
        asyncio.run(clients(transport=transport).model_metadata(NODE, "stage-1"))
    assert len(seen) == 3 and isinstance(info.value.__cause__, httpx.ConnectError)
    transport, seen = _counting(_refuse)
    with pytest.raises(StageUnavailableError):
        asyncio.run(clients(transport=transport).sequences(NODE, "stage-1", 0.5))
    assert len(seen) == 1

    def listing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"sequences": {"7": 3}, "bytes": 96, "capacity_bytes": 1024})

    transport, seen = _counting(listing)
    held = asyncio.run(clients(transport=transport).sequences(NODE, "stage-1", 0.5))
    assert (held.sequences, held.bytes, held.capacity_bytes) == ({"7": 3}, 96, 1024)
    assert seen == ["/v2/models/stage-1/sequences"]
    for answer in (httpx.Response(500, json={}), httpx.Response(200, content=b"[]")):
        transport, _ = _counting(lambda request, a=answer: a)
        with pytest.raises(StageError, match="/v2/models/stage-1/sequences"):
            asyncio.run(clients(transport=transport).sequences(NODE, "stage-1", 0.5))
