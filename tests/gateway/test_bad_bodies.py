"""Bodies no validator sees coming, on every service's JSON routes, in-process: nested 1,000 deep,
invalid UTF-8, a non-JSON content type, a stage tensor shape no array can have. Each is a 4xx that
says what is wrong, and every service keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions import contract as c
from tests.helpers.inproc import InProcessStack, in_process_stack

DEEP = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b', "text": "x"}'
BAD_UTF8 = b'{"prompt": "\xff\xfe", "text": "\xff", "text_list": 1}'
STAGE_1 = c.stage_name(1)


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle) as s:
        yield s


def post(stack: InProcessStack, host: str, path: str, body: bytes, media: str | None) -> httpx.Response:
    return stack.call("POST", path, host, content=body, headers={"Content-Type": media} if media else {})


def message(r: httpx.Response) -> str:
    body: dict[str, Any] = r.json()
    err = body.get("error")
    return str(err["message"] if isinstance(err, dict) else body["detail"])


ROUTES = [
    ("gateway:8000", "/v1/completions"),
    ("gateway:8000", "/api/model/process"),
    ("gateway:8000", "/tokenize"),
    ("tokenizer:8100", "/v1/encode"),
    ("stage-1-r1:8101", f"/v2/models/{STAGE_1}/infer"),
    ("stage-1-r1:8101", f"/v2/models/{STAGE_1}/sequences/release"),
]


@pytest.mark.parametrize(("host", "path"), ROUTES)
@pytest.mark.parametrize(
    ("body", "words"),
    [(DEEP, "nested too deeply"), (BAD_UTF8, "UTF-8")],
    ids=["nested-1000-deep", "invalid-utf8"],
)
def test_undecodable_json_is_400(
    stack: InProcessStack, host: str, path: str, body: bytes, words: str
) -> None:
    r = post(stack, host, path, body, "application/json")
    assert r.status_code == 400 and words.lower() in message(r).lower(), r.text
    assert post(stack, host, "/readyz" if host.startswith("gateway") else "/v2/health/ready", b"", None)


@pytest.mark.parametrize(("host", "path"), [r for r in ROUTES if not r[1].endswith("/infer")])
def test_json_routes_refuse_other_content_types(stack: InProcessStack, host: str, path: str) -> None:
    r = post(stack, host, path, b"prompt=hello", "application/x-www-form-urlencoded")
    assert r.status_code == 415, r.text
    assert "application/json" in message(r) and "x-www-form-urlencoded" in message(r)
    # no Content-Type at all is read as JSON (hand-written clients), a JSON variant is JSON
    for media in (None, "application/json; charset=utf-8", "application/merge-patch+json"):
        assert post(stack, host, path, b"{}", media).status_code in (400, 404), media


@pytest.mark.parametrize("shape", [[2**63 - 1, 0], [2**64, 0], [0, 10**12]])
def test_stage_shapes_no_array_can_have_are_400(stack: InProcessStack, shape: list[int]) -> None:
    header = {"inputs": [{"name": c.SEQUENCE_IDS, "shape": shape, "datatype": "INT64", "data": []}]}
    r = post(stack, "stage-1-r1:8101", f"/v2/models/{STAGE_1}/infer", json.dumps(header).encode(), None)
    assert r.status_code == 400 and "shape" in message(r), r.text
