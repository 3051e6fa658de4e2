"""gateway/id_tokens.py: Cloud Run's ID token on the gateway's calls (TANDEM_GOOGLE_ID_TOKENS=1),
one per service URL from the metadata server, kept until shortly before it expires, alongside the
service token; a metadata server that gives none is a transport failure that names the cause."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest

from gateway.clients import Clients
from gateway.config import parse_config
from gateway.id_tokens import HEADER, GoogleIdTokens, google_id_tokens

STAGE = "https://stage-1-abc-ew.a.run.app"
TOKENIZER = "https://tokenizer-abc-ew.a.run.app"


def jwt(audience: str, exp: float) -> str:
    def part(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'aud': audience, 'exp': exp})}.signature"


class Metadata:
    """A metadata server: an ID token per audience, `lifetime` seconds long; counts the asks."""

    def __init__(self, lifetime: float = 3600, status: int = 200):
        self.asked: list[str] = []
        self.lifetime, self.status = lifetime, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["Metadata-Flavor"] == "Google"
        assert request.url.path.endswith("/service-accounts/default/identity")
        audience = request.url.params["audience"]
        self.asked.append(audience)
        return httpx.Response(self.status, text=jwt(audience, time.time() + self.lifetime) + "\n")


def seen_by_functions(metadata: Metadata, urls: list[str]) -> list[dict[str, str]]:
    """The headers each function got for calls made through a client with the ID-token auth."""
    seen: list[dict[str, str]] = []

    def function(request: httpx.Request) -> httpx.Response:
        seen.append({"url": str(request.url), **request.headers})
        return httpx.Response(200)

    async def calls() -> None:
        auth = GoogleIdTokens(transport=httpx.MockTransport(metadata))
        headers = {"Authorization": "Bearer service-token-0123456789"}
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(function), auth=auth, headers=headers
        ) as c:
            await asyncio.gather(*(c.get(u) for u in urls))

    asyncio.run(calls())
    return seen


def claims(header: str) -> dict[str, object]:
    payload = header.removeprefix("Bearer ").split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "==")))


def test_each_service_gets_a_token_for_its_own_url_fetched_once() -> None:
    metadata = Metadata()
    urls = [f"{STAGE}/v2/models/stage-1/infer"] * 5 + [f"{TOKENIZER}/v1/encode"] * 3
    seen = seen_by_functions(metadata, urls)
    assert sorted(metadata.asked) == [STAGE, TOKENIZER]  # concurrent calls share one fetch
    for headers in seen:
        audience = STAGE if headers["url"].startswith(STAGE) else TOKENIZER
        assert claims(headers[HEADER.lower()])["aud"] == audience
        assert headers["authorization"] == "Bearer service-token-0123456789"  # functions.auth's, kept


def test_a_token_close_to_expiry_is_replaced() -> None:
    metadata = Metadata(lifetime=60)  # under REFRESH_EARLY: never reused
    seen_by_functions(metadata, [STAGE, STAGE])
    assert metadata.asked == [STAGE, STAGE]


def test_no_token_is_a_transport_failure_naming_the_cause() -> None:
    with pytest.raises(httpx.ConnectError, match="metadata server gave no ID token .*404.*service account"):
        seen_by_functions(Metadata(status=404), [STAGE])


def test_on_only_when_asked() -> None:
    assert google_id_tokens({}) is None
    assert google_id_tokens({"TANDEM_GOOGLE_ID_TOKENS": "0"}) is None
    auth = google_id_tokens({"TANDEM_GOOGLE_ID_TOKENS": "1"})
    assert auth is not None and auth.url.startswith("http://metadata.google.internal/")
    auth = google_id_tokens({"TANDEM_GOOGLE_ID_TOKENS": "1", "GCE_METADATA_HOST": "127.0.0.1:8999"})
    assert auth is not None and auth.url.startswith("http://127.0.0.1:8999/computeMetadata/v1/")


def test_the_gateways_clients_send_it() -> None:
    """Clients (what the gateway calls the functions with) carry the auth to the functions."""
    cfg = parse_config(
        {
            "model_name": "gpt2",
            "tokenizer": TOKENIZER,
            "nodes": [{"id": "s", "address": STAGE, "model_part": 0}],
        },
        env={},
    )
    seen: list[httpx.Headers] = []

    def functions(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, content=b"{}", headers={"Tandem-Eos-Token-Id": "0"})

    async def call() -> None:
        auth = GoogleIdTokens(transport=httpx.MockTransport(Metadata()))
        clients = Clients(cfg, httpx.MockTransport(functions), id_tokens=auth)
        try:
            await clients.tokenizer_json()
        finally:
            await clients.aclose()

    asyncio.run(call())
    assert claims(seen[0][HEADER])["aud"] == TOKENIZER
