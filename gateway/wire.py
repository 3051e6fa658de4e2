"""A minimal HTTP/1.1 keep-alive client for the per-token stage calls.

The gateway makes one POST per stage per generated token. aiohttp and httpx both cost a few hundred
microseconds of Python per request on the 2-core machine we measure on (header objects, cookie
jars, tracing hooks, connector bookkeeping); this client does what those calls need and nothing
else: a pool of keep-alive connections per host, one request in flight per connection, the
response parsed by httptools (uvicorn's parser, already a dependency), Content-Length bodies.

Contract for callers:
- `post()` returns (status, lower-cased headers, body) for any HTTP status.
- A connection refused, reset or closed before the whole response arrived raises
  `WireError` (an OSError: callers treat it as a transport error). A pooled connection the server
  closed while idle is retried once on a fresh connection, since the request never reached it.
- The caller bounds the wait (asyncio.timeout); a cancelled or timed-out call closes its
  connection, so a late answer can never be read as the answer to a later request.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import httptools

__all__ = ["WireClient", "WireError"]


class WireError(OSError):
    """The connection failed before a complete response arrived."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.received = False  # any byte of the current response
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._last_header = ""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(WireError(f"unreadable HTTP response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(WireError(f"connection closed before the response was complete ({exc or 'EOF'})"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result((self.parser.get_status_code(), self._headers, body))
        if not self.parser.should_keep_alive():
            self.close()

    # client side
    def start(self, data: bytes) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        self._headers, self._body, self.received = {}, [], False
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)  # one buffer, one segment: a decode step's request is ~4 KB
        return self.waiter

    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class WireClient:
    def __init__(self, connect_timeout: float, max_idle_per_host: int = 64):
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_host
        self._idle: defaultdict[tuple[str, int], list[_Connection]] = defaultdict(list)

    async def post(
        self, host: str, port: int, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literal in brackets
        head = [f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        key = (host, port)
        conn, reused = await self._acquire(key)
        try:
            try:
                result = await conn.start(data)
            except WireError:
                if not (reused and not conn.received):
                    raise
                # the server dropped an idle keep-alive connection: the request never ran there
                conn.close()
                conn, reused = await self._connect(key), False
                result = await conn.start(data)
        except BaseException:
            conn.close()  # cancelled, timed out or failed: its late bytes must never be reused
            raise
        if not conn.closed and len(self._idle[key]) < self.max_idle:
            self._idle[key].append(conn)
        else:
            conn.close()
        return result

    async def _acquire(self, key: tuple[str, int]) -> tuple[_Connection, bool]:
        idle = self._idle[key]
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        return await self._connect(key), False

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, *key)
        except TimeoutError:
            raise WireError(f"connecting to {key[0]}:{key[1]} timed out") from None
        return conn

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
