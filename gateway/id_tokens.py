"""Google ID tokens on the gateway's calls to Cloud Run functions that admit only callers holding
the invoker role (roles/run.invoker): with TANDEM_GOOGLE_ID_TOKENS=1, every httpx call carries
`X-Serverless-Authorization: Bearer <ID token>` for the called service's URL (Cloud Run checks that
header, so `Authorization` keeps the service token of functions.auth). Tokens come from the
instance's metadata server (the service account the gateway runs as) and are kept until a few
minutes before they expire; GCE_METADATA_HOST, which Google's own client libraries read, points
at another metadata server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncGenerator, Mapping

import httpx

from functions.settings import Env

ENV_FLAG = "TANDEM_GOOGLE_ID_TOKENS"
HEADER = "X-Serverless-Authorization"
METADATA_HOST = "metadata.google.internal"
IDENTITY = "/computeMetadata/v1/instance/service-accounts/default/identity"
REFRESH_EARLY = 300.0  # seconds before a token's expiry that a new one is fetched
DEFAULT_LIFETIME = 3600.0  # a Google ID token's lifetime, when its own `exp` cannot be read


def _expiry(token: str) -> float:
    """The `exp` claim of a JWT (not verified: the metadata server is trusted), else an hour."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return time.time() + DEFAULT_LIFETIME


class GoogleIdTokens(httpx.Auth):
    def __init__(self, metadata_host: str = METADATA_HOST, transport: httpx.AsyncBaseTransport | None = None):
        self.url = f"http://{metadata_host}{IDENTITY}"
        self.transport = transport
        self.tokens: dict[str, tuple[str, float]] = {}  # audience -> (token, expiry)
        self.lock = asyncio.Lock()

    async def token(self, audience: str) -> str:
        async with self.lock:  # one fetch per audience, not one per concurrent call
            cached = self.tokens.get(audience)
            if cached and cached[1] - REFRESH_EARLY > time.time():
                return cached[0]
            async with httpx.AsyncClient(transport=self.transport, timeout=5.0) as client:
                r = await client.get(
                    self.url, params={"audience": audience}, headers={"Metadata-Flavor": "Google"}
                )
            if r.status_code != 200:
                raise httpx.ConnectError(
                    f"the metadata server gave no ID token for {audience} ({r.status_code}): does the "
                    f"gateway run on Google Cloud with a service account? ({ENV_FLAG}=1)"
                )
            token = r.text.strip()
            self.tokens[audience] = (token, _expiry(token))
            return token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        audience = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"
        request.headers[HEADER] = f"Bearer {await self.token(audience)}"
        yield request


def google_id_tokens(env: Mapping[str, str] | None = None) -> GoogleIdTokens | None:
    """The ID-token auth when TANDEM_GOOGLE_ID_TOKENS asks for it, else None."""
    if not Env(env).flag(ENV_FLAG):
        return None
    environ = os.environ if env is None else env
    return GoogleIdTokens(environ.get("GCE_METADATA_HOST") or METADATA_HOST)
