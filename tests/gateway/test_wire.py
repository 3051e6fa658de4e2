"""gateway.wire against a scripted HTTP server on 127.0.0.1: keep-alive reuse, a server that drops
idle connections, broken answers, timeouts and cancellation (a late answer is never misread)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.wire import WireClient, WireError

Behaviour = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection


class Server:
    """Reads whole requests (Content-Length bodies); `behaviour` writes the answer."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.connections = 0
        self.requests: list[bytes] = []
        self.heads: list[bytes] = []
        self.closed_by_client = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(body)
                self.heads.append(head)
                if not await self.behaviour(conn, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()

    async def __aenter__(self) -> tuple[Server, int]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self, self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def answer(body: bytes, status: int = 200, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nX-Echo: yes\r\n{extra}\r\n".encode() + body


async def echo(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
    w.write(answer(body[::-1]))
    return True


def run(coro: Awaitable) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_keep_alive_reuses_one_connection_and_returns_any_status() -> None:
    async def main() -> None:
        async def teapot(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            w.write(answer(b'{"detail": "no"}', 418) if body == b"tea" else answer(body[::-1]))
            return True

        async with Server(teapot) as (server, port):
            client = WireClient(connect_timeout=2)
            for i in range(5):
                status, headers, body = await client.post(
                    "127.0.0.1", port, "/p", f"n{i}".encode(), {"A": "b"}
                )
                assert (status, body, headers["x-echo"]) == (200, f"{i}n".encode(), "yes")
            assert await client.post("127.0.0.1", port, "/p", b"tea", {}) == (
                418,
                {"content-length": "16", "x-echo": "yes"},
                b'{"detail": "no"}',
            )
            assert server.connections == 1
            assert server.heads[0].startswith(b"POST /p HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
            assert b"\r\nA: b\r\n" in server.heads[0]
            client.close()

    run(main())


def test_chunked_answers_and_connection_close() -> None:
    async def main() -> None:
        async def chunked(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            return True

        async with Server(chunked) as (server, port):
            client = WireClient(connect_timeout=2)
            assert (await client.post("127.0.0.1", port, "/", b"", {}))[2] == b"abcde"

        async def closing(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            w.write(answer(b"bye", extra="Connection: close\r\n"))
            return False

        async with Server(closing) as (server, port):
            client = WireClient(connect_timeout=2)
            for _ in range(3):
                assert (await client.post("127.0.0.1", port, "/", b"x", {}))[2] == b"bye"
            assert server.connections == 3  # never reused after Connection: close

    run(main())


def test_an_idle_connection_the_server_dropped_is_replaced_transparently() -> None:
    async def main() -> None:
        async def one_per_connection(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            w.write(answer(body))  # keep-alive promised, then closed: a server's idle timeout
            return False

        async with Server(one_per_connection) as (server, port):
            client = WireClient(connect_timeout=2)
            assert (await client.post("127.0.0.1", port, "/", b"1", {}))[2] == b"1"
            await asyncio.sleep(0.05)  # the close reaches the pooled connection
            assert (await client.post("127.0.0.1", port, "/", b"2", {}))[2] == b"2"
            # back to back, the close often arrives only after the next request was written
            for i in range(3, 20):
                assert (await client.post("127.0.0.1", port, "/", b"%d" % i, {}))[2] == b"%d" % i
            assert server.requests == [b"%d" % i for i in range(1, 20)]  # each ran exactly once

    run(main())


def test_a_connection_lost_mid_answer_is_an_error_and_not_retried() -> None:
    async def main() -> None:
        async def half(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
            await w.drain()
            return False

        async with Server(half) as (server, port):
            client = WireClient(connect_timeout=2)
            with pytest.raises(WireError, match="before the response was complete"):
                await client.post("127.0.0.1", port, "/", b"x", {})
            assert server.requests == [b"x"]  # it may have run: the caller decides, no blind retry

        async def garbage(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            w.write(b"NOT HTTP AT ALL\r\n\r\n")
            await w.drain()
            return True

        async with Server(garbage) as (server, port):
            with pytest.raises(WireError):
                await WireClient(connect_timeout=2).post("127.0.0.1", port, "/", b"x", {})

    run(main())


def test_connection_refused_is_an_oserror() -> None:
    async def main() -> None:
        async with Server(echo) as (server, port):
            pass  # closed: nothing listens on port any more
        with pytest.raises(OSError):
            await WireClient(connect_timeout=2).post("127.0.0.1", port, "/", b"x", {})

    run(main())


def test_a_timed_out_call_never_hands_its_late_answer_to_the_next_one() -> None:
    async def main() -> None:
        async def slow_first(conn: int, body: bytes, w: asyncio.StreamWriter) -> bool:
            if body == b"slow":
                await asyncio.sleep(0.3)
            w.write(answer(body))
            return True

        async with Server(slow_first) as (server, port):
            client = WireClient(connect_timeout=2)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await client.post("127.0.0.1", port, "/", b"slow", {})
            assert (await client.post("127.0.0.1", port, "/", b"fast", {}))[2] == b"fast"
            await asyncio.sleep(0.4)
            assert (await client.post("127.0.0.1", port, "/", b"again", {}))[2] == b"again"
            assert server.connections == 2  # the timed-out connection was closed, not pooled

            task = asyncio.create_task(client.post("127.0.0.1", port, "/", b"slow", {}))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.post("127.0.0.1", port, "/", b"after", {}))[2] == b"after"
            client.close()

    run(main())
