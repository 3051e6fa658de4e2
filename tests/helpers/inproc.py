"""The whole stack in one process: the real tokenizer, stage and gateway apps, wired together by an
httpx transport that routes each request to the app serving its host, on one event loop running in
a background thread so that a test module can share one stack. No sockets: the gateway's hot path
(replay, failover, stop strings, cancellation, admission) is testable in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from functions import contract
from functions import stage_api as api
from functions.app import litestar_app
from functions.engine import StageEngine
from functions.fastpath import ASGIApp
from functions.settings import FunctionSettings
from functions.stage import create_stage_app
from functions.stage_state import StageSettings
from functions.tokenizer import create_tokenizer_app
from gateway.app import create_gateway_app
from gateway.config import parse_config
from gateway.discovery import ChatOverride
from gateway.service import Gateway

T = TypeVar("T")


class HostRouter(httpx.AsyncBaseTransport):
    """Routes a request to the in-process app serving its host:port. A host marked down refuses
    the connection, like a process that died (its app keeps running, unreachable); a hung host takes
    infer calls and never answers them while its health checks still pass (a stuck worker behind a
    live server: only a deadline on the call finds it)."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.down: set[str] = set()
        self.hung: set[str] = set()
        self.calls: dict[str, int] = {}
        # > 0: each host answers infer calls one at a time, each taking at least this long, as a
        # stage process computing does (in-process, the apps answer at once, all at the same time)
        self.compute_seconds = 0.0
        self._computing: dict[str, asyncio.Lock] = {}

    def add(self, host: str, app: ASGIApp) -> None:
        self.apps[host] = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.netloc.decode()
        self.calls[host] = self.calls.get(host, 0) + 1
        if host in self.down or host not in self.apps:
            raise httpx.ConnectError(f"connection refused by {host}", request=request)
        if host in self.hung and api.is_infer_path(request.url.path):
            await asyncio.Event().wait()  # until the caller gives up (cancels)
        if self.compute_seconds and api.is_infer_path(request.url.path):
            async with self._computing.setdefault(host, asyncio.Lock()):
                await asyncio.sleep(self.compute_seconds)
                return await self.apps[host].handle_async_request(request)
        return await self.apps[host].handle_async_request(request)


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run an ASGI app's startup and, on exit, its shutdown."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))  # type: ignore[arg-type]
    await inbox.put({"type": "lifespan.startup"})
    message = await outbox.get()
    assert message["type"] == "lifespan.startup.complete", message
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


@dataclass
class InProcessStack:
    router: HostRouter
    gateway_app: ASGIApp
    stage_apps: dict[str, ASGIApp]  # node id -> app
    loop: asyncio.AbstractEventLoop
    hosts: dict[str, str] = field(default_factory=dict)  # node id -> host:port

    @property
    def gateway(self) -> Gateway:
        gw: Gateway = litestar_app(self.gateway_app).state.gateway
        return gw

    def engine(self, node_id: str) -> StageEngine:
        loader = litestar_app(self.stage_apps[node_id]).state.loader
        assert loader.engine is not None
        return loader.engine

    def held(self, node_id: str) -> dict[int, int]:
        return self.engine(node_id).held()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.gateway_app), base_url="http://gateway"
        )

    def call(self, method: str, path: str, host: str = "gateway:8000", **kw: Any) -> httpx.Response:
        """One request to a service of the stack (by its host name), from the test's thread."""

        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=self.router, base_url=f"http://{host}") as client:
                return await client.request(method, path, **kw)

        return self.run(go())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the stack's loop from the test's thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def _wait_ready(client: httpx.AsyncClient, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = await client.get(url)
        if r.status_code == 200:
            return
        last = r.text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} not ready after {timeout} s: {last}")


@contextlib.contextmanager
def in_process_stack(
    bundle: Path,
    *,
    replicas: tuple[int, ...] = (1, 1, 1),
    config: dict[str, Any] | None = None,
    auth_token: str | None = None,
    api_keys: tuple[str, ...] = (),
    max_batch_tokens: int | None = None,
    stage_settings: dict[str, Any] | None = None,
    chat_template: ChatOverride | None = None,
) -> Iterator[InProcessStack]:
    """Tokenizer, stage replicas and gateway apps on a background event loop, ready to serve.
    With `auth_token` the functions require it (and the gateway sends it); with `api_keys` the
    gateway requires one of them from clients. `stage_settings` overrides StageSettings fields of
    every stage (`max_batch_tokens` is one of them); `chat_template` replaces the model's (the
    gateway's --chat-template)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="inproc-stack", daemon=True)
    thread.start()
    router = HostRouter()
    fn = FunctionSettings(port=0, auth_token=auth_token)
    router.add("tokenizer:8100", create_tokenizer_app(bundle, fn))
    stage_apps: dict[str, ASGIApp] = {}
    hosts: dict[str, str] = {}
    nodes = []
    for k, n in enumerate(replicas):
        for r in range(n):
            node_id = f"{contract.stage_name(k + 1)}-r{r + 1}"
            host = f"{node_id}:{8101 + k}"
            settings = StageSettings(bundle=bundle, stage=contract.stage_name(k + 1), threads=1)
            overrides = dict(stage_settings or {})
            if max_batch_tokens is not None:
                overrides["max_batch_tokens"] = max_batch_tokens
            settings = dataclasses.replace(settings, **overrides)
            stage_apps[node_id] = create_stage_app(settings, fn)
            router.add(host, stage_apps[node_id])
            hosts[node_id] = host
            nodes.append({"id": node_id, "address": host, "model_part": k})
    cfg = {"model_name": "gpt2", "tokenizer": {"address": "tokenizer:8100"}, "nodes": nodes}
    cfg |= {"health_interval": 0.05, "stage_wait": 1, "backoff": 0.001, **(config or {})}
    gw_settings = FunctionSettings(port=0, auth_token=auth_token, api_keys=api_keys)
    gateway_app = create_gateway_app(
        parse_config(cfg, env={}), gw_settings, router, chat_template=chat_template
    )
    router.add("gateway:8000", gateway_app)
    stack = InProcessStack(router, gateway_app, stage_apps, loop, hosts)

    async def start(stack_exit: contextlib.AsyncExitStack) -> None:
        for app in [*(t.app for t in router.apps.values() if t.app is not gateway_app), gateway_app]:
            await stack_exit.enter_async_context(lifespan(app))
        async with httpx.AsyncClient(transport=router) as c:
            await _wait_ready(c, "http://tokenizer:8100/v2/health/ready")
            for host in hosts.values():
                await _wait_ready(c, f"http://{host}/v2/health/ready")
            await _wait_ready(c, "http://gateway:8000/readyz")

    exits = contextlib.AsyncExitStack()
    try:
        stack.run(start(exits), timeout=60)
        yield stack
    finally:
        stack.run(exits.aclose(), timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def head_calls(stack: InProcessStack, replica: str) -> Iterator[list[int]]:
    """While open, every call of the last stage's scoring head appends the number of prompt
    positions it scores (targets >= 0), so that a test can tell each position is scored once."""
    import numpy as np

    head = stack.engine(replica).head
    assert head is not None
    calls: list[int] = []
    real_run = head.run

    def counting_run(hidden: Any, target_ids: Any) -> list[Any]:
        calls.append(int((np.asarray(target_ids) >= 0).sum()))
        return real_run(hidden, target_ids)

    head.run = counting_run  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del head.run
