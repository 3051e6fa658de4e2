"""Authentication, in-process: the functions accept calls only with the service token (the
gateway sends it), the gateway only with a client API key; health, metrics and docs stay open;
refusals are 401 with a Bearer challenge and a message that says what is missing, and are counted."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from functions import contract as c
from functions import protocol
from functions.settings import FunctionSettings, SettingsError
from tests.helpers.inproc import InProcessStack, in_process_stack

TOKEN = "service-token-0123456789abcdef"
KEY = "sk-client-key-0123456789abcdef"
OTHER_KEY = "sk-another-key-0123456789abcdef"
STAGE_1, STAGE_3 = c.stage_name(1), c.stage_name(3)


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle, auth_token=TOKEN, api_keys=(KEY, OTHER_KEY)) as s:
        yield s


def call(stack: InProcessStack, host: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return stack.call(method, path, host, **kw)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stage_infer(stack: InProcessStack, headers: dict[str, str]) -> httpx.Response:
    body, hlen = protocol.encode_request(
        {
            c.SEQUENCE_IDS: np.array([7], np.int64),
            c.PAST_LENGTHS: np.array([0], np.int64),
            c.INPUT_IDS: np.array([[1, 2, 3]], np.int64),
        }
    )
    path = f"/v2/models/{STAGE_1}/infer"
    return call(
        stack,
        stack.hosts["stage-1-r1"],
        "POST",
        path,
        content=body,
        headers={protocol.HEADER: str(hlen), **headers},
    )


def refused(r: httpx.Response, *words: str) -> str:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    message = str(body["error"]["message"] if isinstance(body["error"], dict) else body["detail"])
    for w in words:
        assert w in message, message
    assert TOKEN not in r.text and KEY not in r.text
    return message


def test_functions_want_the_service_token(stack: InProcessStack) -> None:
    stage = stack.hosts["stage-1-r1"]
    refused(stage_infer(stack, {}), "TANDEM_AUTH_TOKEN", "Authorization: Bearer")  # the fast path
    refused(stage_infer(stack, bearer("wrong-token-0123456789")), "not the service token")
    refused(stage_infer(stack, {"Authorization": TOKEN}))  # no scheme
    sequences = f"/v2/models/{STAGE_1}/sequences"
    refused(call(stack, stage, "GET", sequences))  # a Litestar route
    release = f"/v2/models/{STAGE_1}/sequences/release"
    refused(call(stack, stage, "POST", release, json={c.SEQUENCE_IDS: [7]}))
    refused(call(stack, "tokenizer:8100", "POST", "/v1/encode", json={"text": ["hi"]}))
    assert stage_infer(stack, bearer(TOKEN)).status_code == 200
    assert call(stack, stage, "GET", sequences, headers=bearer(TOKEN)).json()["sequences"] == {"7": 3}
    r = call(stack, stage, "POST", release, json={c.SEQUENCE_IDS: [7]}, headers=bearer(TOKEN))
    assert r.status_code == 200, r.text
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/docs/openapi.json"):
        assert call(stack, stage, "GET", path).status_code == 200, path


def test_the_gateway_wants_an_api_key_and_sends_the_token(stack: InProcessStack) -> None:
    gw = "gateway:8000"
    body = {"prompt": "hello", "max_tokens": 3}
    message = refused(call(stack, gw, "POST", "/v1/completions", json=body), "API key")
    assert "Authorization: Bearer" in message
    refused(call(stack, gw, "POST", "/v1/completions", json=body, headers=bearer(TOKEN)))
    refused(call(stack, gw, "POST", "/api/model/process", json={"text": "hello"}))
    refused(call(stack, gw, "POST", "/tokenize", json={"prompt": "hello"}))
    for key in (KEY, OTHER_KEY):  # the whole pipeline runs: the gateway's calls carry the token
        r = call(stack, gw, "POST", "/v1/completions", json=body, headers=bearer(key))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    for path in ("/health", "/readyz", "/metrics", "/docs/openapi.json"):
        assert call(stack, gw, "GET", path).status_code == 200, path
    metrics = call(stack, gw, "GET", "/metrics").text
    assert 'route="/api/model/process",status="401"' in metrics


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TANDEM_AUTH_TOKEN": "short"}, ("TANDEM_AUTH_TOKEN", "16")),
        ({"TANDEM_API_KEYS": f"{KEY}, tiny"}, ("TANDEM_API_KEYS", "16")),
    ],
)
def test_short_tokens_are_refused_at_start(env: dict[str, str], words: tuple[str, ...]) -> None:
    with pytest.raises(SettingsError) as err:
        FunctionSettings.from_env(8000, env)
    for w in words:
        assert w in str(err.value)


def test_tokens_are_read_and_never_shown() -> None:
    s = FunctionSettings.from_env(
        8000, {"TANDEM_AUTH_TOKEN": TOKEN, "TANDEM_API_KEYS": f" {KEY} ,,{OTHER_KEY}"}
    )
    assert s.auth_token == TOKEN and s.api_keys == (KEY, OTHER_KEY)
    assert TOKEN not in repr(s) and KEY not in repr(s)
    assert FunctionSettings.from_env(8000, {"TANDEM_AUTH_TOKEN": ""}).auth_token is None  # empty = unset


def test_docs_are_open_and_load_nothing_from_another_origin(stack: InProcessStack) -> None:
    """Swagger UI on every service, its scripts and styles served by the service itself."""
    for host in ("gateway:8000", "tokenizer:8100", stack.hosts["stage-1-r1"]):
        for page in ("/docs", "/docs/swagger"):
            r = call(stack, host, "GET", page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (host, page)
            urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""", r.text)
            assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
            assert len(assets) == 4, (host, urls)  # the bundle, the preset, the stylesheet, the icon
            assert not [u for u in urls if "//" in u], f"{host}{page} loads from elsewhere: {urls}"
            for url in assets:
                asset = call(stack, host, "GET", url)
                assert asset.status_code == 200 and len(asset.content) > 500, (host, url)
        assert "swagger-ui" in call(stack, host, "GET", "/docs/assets/swagger-ui-bundle.js").text[:5000]
