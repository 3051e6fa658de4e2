"""Connection timeouts a slow or idle client cannot outwait (uvicorn has only the keep-alive one):

- headers: a connection must deliver a request's whole head within `header_timeout` seconds of
  connecting (or of starting the next request on a kept-alive connection), else it is closed;
- body: each chunk of a request body must arrive within `body_timeout` seconds, else the request
  is answered 408; once the body is in, `receive` is left alone (a streamed response waits on it
  for the client's disconnect for as long as the stream lasts);
- idle keep-alive: uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from functions.errors import FunctionError
from functions.fastpath import ASGIApp, Message, Receive, Scope, Send

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
IDLE_KEEP_ALIVE = 5.0


class RequestTimeoutError(FunctionError):
    status_code = 408
    title = "Request Timeout"


def header_timeout_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose request head is too slow."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


class BodyTimeout:
    """ASGI wrapper: a request body chunk that takes longer than `seconds` ends the request (408)."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = stalled = False

        async def timed_receive() -> Message:
            nonlocal body_done, stalled
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):  # no task per call, unlike wait_for
                    message = await receive()
            except TimeoutError:
                stalled = True
                raise RequestTimeoutError(
                    f"the request body stalled: no data for {self.seconds:g} s (TANDEM_BODY_TIMEOUT)"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if stalled and message["type"] == "http.response.start":  # the rest of the body is unread:
                headers = [*message.get("headers", []), (b"connection", b"close")]  # not reusable
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, timed_receive, closing_send)
