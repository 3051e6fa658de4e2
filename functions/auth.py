"""Bearer-token authentication for every service: the stage and tokenizer functions accept calls
only with the shared token (TANDEM_AUTH_TOKEN) that the gateway sends; the gateway accepts client
API keys (TANDEM_API_KEYS, OpenAI style `Authorization: Bearer KEY`). With no token configured a
service is open, as before.

Health, metrics and the API docs stay open on every service: probes and Prometheus do not carry
secrets, and none of them reveals or changes what a client sent. The same goes for the optional
Host check (TANDEM_ALLOWED_HOSTS, `host_refusal`).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass


def host_refusal(path: str, host: str | None, allowed: tuple[str, ...]) -> str | None:
    """Why a request to `path` with this Host header is refused (TANDEM_ALLOWED_HOSTS: names, or
    `*.domain` for its subdomains; empty = any host); None if allowed. A page on another site that
    makes its name resolve to this machine (DNS rebinding) sends its own name as Host. Health,
    metrics and docs answer any host: probes address pods by IP."""
    if not allowed or OPEN_PATHS.fullmatch(path):
        return None
    name = (host or "").strip().lower()
    if name.startswith("["):  # [IPv6]:port
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:  # name:port
        name = name.rsplit(":", 1)[0]
    for pattern in allowed:
        p = pattern.lower()
        if name == p or (p.startswith("*.") and name.endswith(p[1:])):
            return None
    return f"the Host header {host!r} is not a name this service answers to (TANDEM_ALLOWED_HOSTS)"


OPEN_PATHS = re.compile(r"/(v2/health/(live|ready)|healthz|readyz|health|metrics|docs(/.*)?)")
MIN_TOKEN_LENGTH = 16
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tandem"'}


@dataclass(frozen=True)
class Authenticator:
    tokens: tuple[bytes, ...]
    what: str  # how a missing credential is named in messages: "the service token", "an API key"

    @classmethod
    def of(cls, tokens: Iterable[str], what: str) -> Authenticator | None:
        """None (an open service) when no token is given."""
        kept = tuple(t.encode() for t in tokens if t)
        return cls(kept, what) if kept else None

    def refusal(self, path: str, authorization: str | None) -> str | None:
        """Why a request to `path` with this Authorization header is refused; None if allowed."""
        if OPEN_PATHS.fullmatch(path):
            return None
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return f"this service requires {self.what}: send `Authorization: Bearer <token>`"
        raw = given.strip().encode()
        # compare against every token, always: the time taken does not tell which one nearly matched
        ok = [hmac.compare_digest(raw, t) for t in self.tokens]
        return None if any(ok) else f"the bearer token is not {self.what}"
