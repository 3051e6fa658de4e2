"""HTTP clients for the stage and tokenizer functions: keep-alive pools, binary Open Inference
Protocol v2, explicit timeouts, bounded retries with backoff on transport errors only (never on
4xx). This is the one place where client errors become gateway errors.

Stage infer calls go through one seam, `StagePoster.post(url, body, headers)`: by default
`gateway.wire` (a minimal keep-alive HTTP/1.1 client) for http stages and httpx for https ones;
measured on the 2-core machine, each of the three calls per token cost ~1 ms less with aiohttp than
with httpx's async client, and less again with `wire` (docs/benchmarks.md). Tests inject an httpx
transport (ASGI apps in-process) or a fake poster. httpx serves the rest (tokenizer, health,
releases), where a millisecond does not matter.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec
import numpy as np

from functions import contract, protocol
from functions import stage_api as api
from gateway.config import GatewayConfig, Node
from gateway.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    StageError,
    StageTimeoutError,
    StageUnavailableError,
)
from gateway.wire import WireClient

logger = logging.getLogger("tandem.gateway")
T = TypeVar("T")
JSON = {"Content-Type": "application/json"}


class StageConflict(Exception):
    """409: some rows' past lengths are not what the stage holds (nothing was changed there)."""

    def __init__(self, held: dict[int, int]):
        super().__init__(f"stage holds other lengths for {sorted(held)}")
        self.held = held  # sequence id -> positions the stage holds


class StageRejected(StageError):
    """A 4xx other than 409: the stage refused the batch itself (a gateway bug or a bound hit)."""


Answer = tuple[int, Mapping[str, str], bytes]  # status, headers (any case), body


class StagePoster(Protocol):
    """Sends one POST and returns the answer for any status; raises OSError / httpx.TransportError
    when the connection fails and TimeoutError / httpx.TimeoutException when it takes too long."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer: ...

    async def aclose(self) -> None: ...


class HttpxPoster:
    """Every POST through one httpx client (https stages, or an injected transport in tests)."""

    def __init__(self, http: httpx.AsyncClient):
        self.http = http

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        r = await self.http.post(url, content=body, headers=headers)
        return r.status_code, r.headers, r.content

    async def aclose(self) -> None:
        pass  # the client belongs to its owner


class WirePoster:
    """http:// through gateway.wire (bounded by `timeout`), anything else through httpx."""

    def __init__(self, connect_timeout: float, timeout: float, http: httpx.AsyncClient):
        self.wire = WireClient(connect_timeout)
        self.timeout = timeout
        self.fallback = HttpxPoster(http)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        parts = urlsplit(url)
        if parts.scheme != "http":  # https (Cloud Run, Knative behind TLS): httpx does TLS
            return await self.fallback.post(url, body, headers)
        async with asyncio.timeout(self.timeout):
            return await self.wire.post(
                parts.hostname or "127.0.0.1", parts.port or 80, parts.path, body, headers
            )

    async def aclose(self) -> None:
        self.wire.close()


class Clients:
    def __init__(
        self,
        cfg: GatewayConfig,
        transport: httpx.AsyncBaseTransport | None = None,
        poster: StagePoster | None = None,
        *,
        auth_token: str | None = None,
        id_tokens: httpx.Auth | None = None,
    ):
        """`transport` carries every call when given (e.g. ASGI apps in-process); `poster` replaces
        only the stage infer calls. `auth_token` goes with every call to the functions, and
        `id_tokens` adds Cloud Run's ID token to those httpx makes (gateway.id_tokens)."""
        self.cfg = cfg
        timeout = httpx.Timeout(cfg.call_timeout, connect=cfg.connect_timeout)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.auth = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self.http = httpx.AsyncClient(
            timeout=timeout, limits=limits, transport=transport, headers=self.auth, auth=id_tokens
        )
        if poster is None:
            poster = HttpxPoster(self.http) if transport is not None else None
        self.poster: StagePoster = poster or WirePoster(cfg.connect_timeout, cfg.call_timeout, self.http)

    async def aclose(self) -> None:
        await self.poster.aclose()
        await self.http.aclose()

    async def _retrying(
        self, node_desc: str, what: str, send: Callable[[], Awaitable[T]], retries: int | None = None
    ) -> T:
        """`send()` with bounded retries (`retries`, else the configured number) and exponential
        backoff on connection failures only; the one place where either client's errors become
        gateway errors."""
        delay = self.cfg.backoff
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return await send()
            except (TimeoutError, httpx.TimeoutException) as e:
                # A timed-out call may have run: no blind retry, the caller replays if needed.
                raise StageTimeoutError(f"{node_desc} did not answer {what} within its timeout") from e
            except (OSError, httpx.TransportError) as e:  # gateway.wire raises OSErrors
                if attempt == retries:
                    raise StageUnavailableError(
                        f"{node_desc} ({what}) refused or dropped the connection ({type(e).__name__}); "
                        "is it running? GET /v2/health/ready"
                    ) from e
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _request(
        self, node_desc: str, method: str, url: str, retries: int | None = None, **kw: Any
    ) -> httpx.Response:
        # messages name the path only: internal addresses stay out of what clients see
        return await self._retrying(
            node_desc, f"{method} {urlsplit(url).path}", lambda: self.http.request(method, url, **kw), retries
        )

    async def infer(
        self,
        node: Node,
        stage: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        headers: dict[str, str] | None = None,
        timing: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """One inference call; `timing`, when given, gets "server" = the stage's own seconds in its
        session (its Server-Timing header), when it sends them."""
        body, hlen = protocol.encode_request(inputs, outputs=outputs, binary_outputs=True)
        path = api.infer_path(stage)
        url = node.url + path
        h = {
            protocol.HEADER: str(hlen),
            "Content-Type": "application/octet-stream",
            **self.auth,
            **(headers or {}),
        }
        desc = f"{stage} replica {node.id!r}"
        status, rh, content = await self._retrying(
            desc, f"POST {path}", lambda: self.poster.post(url, body, h)
        )
        if status == 200:
            raw = rh.get(protocol.HEADER.lower())  # wire's headers are lower-cased; httpx's match any case
            if timing is not None and (server := server_seconds(rh.get("server-timing"))) is not None:
                timing["server"] = server
            try:
                return protocol.decode_response(content, int(raw) if raw is not None else None).outputs
            except (protocol.ProtocolError, ValueError) as e:
                raise StageError(f"{stage} replica {node.id!r} sent an unreadable answer: {e}") from e
        detail = _detail_of(content)
        if status == 409:
            try:
                held = contract.parse_conflict(json.loads(content))
            except ValueError as e:  # also contract.ContractError
                raise StageError(f"{stage} replica {node.id!r} sent an unreadable 409: {detail}") from e
            raise StageConflict(held)
        if status == 503:
            raise StageUnavailableError(f"{stage} replica {node.id!r} is not ready: {detail}")
        if 400 <= status < 500:
            raise StageRejected(f"{stage} replica {node.id!r} rejected the batch ({status}): {detail}")
        raise StageError(f"{stage} replica {node.id!r} failed ({status}): {detail}")

    async def release(self, node: Node, stage: str, seq_ids: list[int]) -> None:
        """Best effort: a lost release only delays freeing until the stage's idle timeout."""
        body = msgspec.json.encode(api.ReleaseRequest(seq_ids))
        try:
            await self.http.post(node.url + api.release_path(stage), content=body, headers=JSON, timeout=5.0)
        except httpx.HTTPError as e:
            logger.warning("release of %d sequence(s) on %s failed: %s", len(seq_ids), node.id, e)

    async def fork(self, node: Node, stage: str, parent: int, length: int, children: list[int]) -> bool:
        """Children that start as a copy of `parent`'s KV cache there (the stage frees the parent).
        False when it did not happen: each child then replays its prompt there (a 409 on its first
        call), so a lost fork only costs a prefill."""
        body = msgspec.json.encode(api.ForkRequest(parent, length, children))
        url = node.url + api.fork_path(stage)
        try:
            r = await self.http.post(url, content=body, headers=JSON, timeout=self.cfg.call_timeout)
        except httpx.HTTPError as e:
            logger.warning("fork of a sequence on %s failed: %s", node.id, type(e).__name__)
            return False
        if r.status_code != 200:
            logger.warning("fork of a sequence on %s refused (%d): %s", node.id, r.status_code, _detail(r))
        return r.status_code == 200

    async def model_metadata(self, node: Node, stage: str) -> httpx.Response:
        """GET a replica's model metadata (the wire description the gateway lays out its stages by)."""
        url = node.url + api.model_path(stage)
        return await self._request(f"{stage} replica {node.id!r}", "GET", url, timeout=2.0)

    async def sequences(self, node: Node, stage: str, timeout: float) -> api.SequencesAnswer:
        """The KV cache a replica holds, asked once (no retry: a caller that polls asks again);
        StageError (or a subclass) saying why when it cannot be read."""
        path = api.sequences_path(stage)
        desc = f"{stage} replica {node.id!r}"
        r = await self._request(desc, "GET", node.url + path, retries=0, timeout=timeout)
        if r.status_code != 200:
            raise StageError(f"GET {path} answered {r.status_code}")
        try:
            return msgspec.json.decode(r.content, type=api.SequencesAnswer)
        except msgspec.DecodeError as e:  # ValidationError is one
            raise StageError(f"GET {path} sent an unreadable answer") from e

    async def ready(self, url: str) -> tuple[bool, str]:
        try:
            r = await self.http.get(f"{url}/v2/health/ready", timeout=2.0)
        except httpx.HTTPError as e:
            return False, f"unreachable ({type(e).__name__})"
        return (True, "ready") if r.status_code == 200 else (False, _detail(r))

    async def tokenizer_json(self) -> tuple[bytes, list[int]]:
        """The tokenizer's JSON and its end-of-sequence ids."""
        r = await self._request("tokenizer", "GET", f"{self.cfg.tokenizer_url}/v1/tokenizer")
        if r.status_code != 200:
            raise StageUnavailableError(
                f"the tokenizer has no tokenizer to give ({r.status_code}): {_detail(r)}"
            )
        return r.content, contract.parse_eos_header(r.headers.get(contract.EOS_HEADER))

    async def chat_template(self) -> dict[str, Any]:
        """The model's chat template and special tokens' strings (none from an older tokenizer: 404)."""
        r = await self._request("tokenizer", "GET", f"{self.cfg.tokenizer_url}{contract.CHAT_TEMPLATE_PATH}")
        if r.status_code not in (200, 404):
            raise StageUnavailableError(f"the tokenizer's chat template: {r.status_code} {_detail(r)}")
        body: dict[str, Any] = r.json() if r.status_code == 200 else {}
        return body

    async def encode(
        self, texts: list[str], headers: dict[str, str] | None = None, *, add_special_tokens: bool = False
    ) -> list[list[int]]:
        body = {"text": texts, "add_special_tokens": add_special_tokens}
        r = await self._request(
            "tokenizer", "POST", f"{self.cfg.tokenizer_url}/v1/encode", json=body, headers=headers or {}
        )
        if r.status_code in (400, 413):  # the text itself (too long, not encodable): the client's to fix
            kind = InvalidRequestError if r.status_code == 400 else PayloadTooLargeError
            raise kind(f"the tokenizer refused the prompt: {_detail(r)}", param="prompt")
        if r.status_code == 503:
            raise StageUnavailableError(f"the tokenizer is not ready: {_detail(r)}")
        if r.status_code != 200:
            raise StageError(f"tokenizer failed to encode ({r.status_code}): {_detail(r)}")
        try:
            ids = r.json()["ids"]
            if not (isinstance(ids, list) and all(isinstance(i, list) for i in ids)):
                raise TypeError("ids is not a list of lists")
        except (ValueError, KeyError, TypeError) as e:
            raise StageError(f"the tokenizer sent an unreadable answer: {e}") from e
        return ids


def _detail(r: httpx.Response) -> str:
    return _detail_of(r.content)


def _detail_of(content: bytes) -> str:
    try:
        body = json.loads(content)
        return str(body.get("detail") or body.get("error") or body)
    except (ValueError, AttributeError):
        return content[:200].decode(errors="replace")


def server_seconds(header: str | None) -> float | None:
    """The `dur` (milliseconds) of a Server-Timing header's first metric, in seconds; None when
    absent or unreadable (a stage that does not send it is not wrong)."""
    if not header:
        return None
    for part in header.split(",", 1)[0].split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key == "dur":
            try:
                return float(value) / 1000.0
            except ValueError:
                return None
    return None
