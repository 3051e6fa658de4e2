"""The gateway service: clients, replica health, the scheduler, and the one face every route uses
(admit, then stream or collect; tokenize and detokenize; the chat template). Routes never reach the
scheduler themselves. Start-up discovery lives in gateway.discovery, prompt checks in
gateway.admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import httpx
from litestar import Request
from opentelemetry import trace
from opentelemetry.propagate import inject
from prometheus_client import CollectorRegistry

from functions.tokenizer_core import TokenizerCore
from gateway.admission import check_prompt
from gateway.call_inputs import StageLayout
from gateway.chat_template import ChatTemplate
from gateway.clients import Clients, StagePoster
from gateway.config import GatewayConfig
from gateway.discovery import ChatOverride, discover
from gateway.errors import ClientClosedError, InvalidRequestError, NotFoundError, StageUnavailableError
from gateway.metrics import GatewayMetrics, StageUpCollector
from gateway.pipeline import Pipeline
from gateway.replicas import Replicas
from gateway.scheduler import Scheduler
from gateway.sequence import Event, Outcome, SamplingParams, Sequence
from gateway.tracing import annotate_request, annotate_response

logger = logging.getLogger("tandem.gateway")
tracer = trace.get_tracer("tandem.gateway")


class Gateway:
    """The one face the routes use: admit prompts, then `stream` or `collect` their sequences (the
    scheduler behind it is this object's own); tokenize and detokenize; the chat template."""

    def __init__(
        self,
        cfg: GatewayConfig,
        registry: CollectorRegistry,
        transport: httpx.AsyncBaseTransport | None = None,
        poster: StagePoster | None = None,
        *,
        auth_token: str | None = None,
        id_tokens: httpx.Auth | None = None,
        chat_override: ChatOverride | None = None,
    ):
        self.cfg = cfg
        self.clients = Clients(cfg, transport, poster, auth_token=auth_token, id_tokens=id_tokens)
        self.replicas = Replicas(cfg, self.clients)
        self.metrics = GatewayMetrics(registry)
        self.metrics.init_stages([p.name for p in self.replicas.pools])
        registry.register(StageUpCollector(self.replicas))
        self.scheduler: Scheduler | None = None
        self.tokenizer: TokenizerCore | None = None
        self.layout: StageLayout | None = None
        self.chat_override = chat_override
        self.chat_template: ChatTemplate | None = None
        self.chat_problem = "the gateway is not ready"
        self.tracing = False  # spans are exported (the UI shows trace links only then)
        self.status = "discovering the tokenizer and stages"
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ----
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self.replicas.run(), name="health"))
        self._tasks.append(asyncio.create_task(self._discover(), name="discover"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.clients.aclose()

    async def _discover(self) -> None:
        """Retry until the tokenizer and one replica of every stage describe themselves."""
        while True:
            try:
                found = await discover(self.clients, self.replicas, self.cfg.model_name, self.chat_override)
                break
            except Exception as e:  # keep trying: functions may start after the gateway
                self.status = f"waiting for the functions: {e}"
                await asyncio.sleep(0.5)
        self.layout, self.tokenizer = found.layout, found.tokenizer
        self.chat_template, self.chat_problem = found.chat, found.chat_problem
        pipeline = Pipeline(
            self.cfg, self.clients, self.replicas, self.metrics, self.layout, self.tokenizer.eos_token_ids
        )
        self.scheduler = Scheduler(
            self.cfg, self.clients, self.replicas, self.metrics, self.tokenizer, pipeline
        )
        self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
        self.status = "ready"
        logger.info("gateway ready: %d stages, model %s", self.cfg.stages, self.layout.model_id)

    def readiness(self) -> tuple[bool, str]:
        if self.scheduler is None:
            return False, self.status
        return self.replicas.readiness()

    def check_model(self, model: str | None) -> None:
        """A request's `model`, when given, must be the one served here (404 naming it)."""
        if model is not None and model != self.cfg.model_name:
            raise NotFoundError(
                f"model {model!r} is not served here; GET /v1/models lists {self.cfg.model_name!r}",
                param="model",
            )

    def require_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise StageUnavailableError(f"the gateway is not ready: {self.status}")
        return self.scheduler

    def ready_layout(self) -> tuple[StageLayout, TokenizerCore]:
        """The stage layout and the tokenizer, once discovered (else 503)."""
        self.require_scheduler()
        assert self.layout is not None and self.tokenizer is not None  # set with the scheduler
        return self.layout, self.tokenizer

    def chat(self) -> ChatTemplate:
        """The chat template to render, or a 400 saying why there is none."""
        self.require_scheduler()
        if self.chat_template is None:
            raise InvalidRequestError(self.chat_problem, param="messages")
        return self.chat_template

    # ---- what the routes use ----
    async def admit(
        self,
        params: SamplingParams,
        *,
        texts: list[str] | None = None,
        ids: list[list[int]] | None = None,
        param: str = "prompt",
        operation: str = "text_completion",
        n: int = 1,
    ) -> list[Sequence]:
        """The one admission path: encode the texts (or take token ids), check every prompt against
        the model, then queue all of them or none (429), `n` sequences per prompt sharing its
        prefill (returned prompt by prompt). `param` names the field in errors; `operation` is the
        request span's gen_ai.operation.name."""
        sched = self.require_scheduler()
        ready, why = self.replicas.readiness()
        if not ready:  # new work would only wait for a stage that is not there
            raise StageUnavailableError(f"not accepting requests now: {why}", headers={"Retry-After": "5"})
        if texts is not None:
            if any(t == "" for t in texts):
                raise InvalidRequestError(f"{param} must not be empty", param=param)
            ids = await self.encode(texts)
        if not ids:
            raise InvalidRequestError(f"{param} must not be empty", param=param)
        for p in ids:
            self.check_prompt(p, params, param)
        span = trace.get_current_span()
        annotate_request(span, operation, self.cfg.model_name, params, sum(len(p) for p in ids))
        return sched.submit_all(ids, params, span, n)

    def annotate_response(
        self, span: trace.Span, seqs: list[Sequence], output_tokens: int, finish_reasons: list[str | None]
    ) -> None:
        """The request span's gen_ai.usage / gen_ai.response attributes and per-stage sums."""
        stages = [p.name for p in self.replicas.pools]
        annotate_response(span, seqs, stages, output_tokens, finish_reasons)

    def stage_ms(self, seqs: list[Sequence]) -> dict[str, float]:
        """Milliseconds spent in each stage's calls for these sequences."""
        return {
            p.name: round(sum(s.stage_seconds[p.index] for s in seqs) * 1000, 2) for p in self.replicas.pools
        }

    async def encode(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        with tracer.start_as_current_span("tokenizer encode") as span:
            headers: dict[str, str] = {}
            inject(headers)
            ids = await self.clients.encode(texts, headers, add_special_tokens=add_special_tokens)
            span.set_attribute("gen_ai.usage.input_tokens", sum(len(i) for i in ids))
        return ids

    def token_text(self, token: int) -> str:
        """One token's text (for logprobs)."""
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""

    def decode(self, ids: list[int]) -> str:
        _, tok = self.ready_layout()
        return tok.decode(ids)

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        if self.layout is None:
            raise StageUnavailableError(f"the gateway is not ready: {self.status}")
        check_prompt(self.layout, ids, params, param)

    async def stream(self, seqs: list[Sequence]) -> AsyncGenerator[tuple[int, Event], None]:
        """Every event of these sequences as it comes, with the sequence's index; it ends when all
        have finished, or right after the first error event. However it ends (the consumer stops
        early or is cancelled because the client went away), every sequence still running is
        cancelled and its KV cache freed. Consume it inside `contextlib.aclosing`."""
        sched = self.require_scheduler()
        queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

        async def pump(i: int, s: Sequence) -> None:
            async for ev in sched.stream(s):
                queue.put_nowait((i, ev))
            queue.put_nowait((i, None))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
        try:
            left = len(seqs)
            while left:
                i, ev = await queue.get()
                if ev is None:
                    left -= 1
                    continue
                yield i, ev
                if ev.kind == "error":
                    return
        finally:
            for s in seqs:
                sched.cancel(s)  # a no-op for finished ones
            for p in pumps:
                p.cancel()

    async def collect(
        self, seqs: list[Sequence], wait_disconnect: Callable[[], Awaitable[None]]
    ) -> list[Outcome]:
        """Run sequences to the end; if the client goes away first, cancel them all and raise
        ClientClosedError (the route's error handler counts it as 499); an error event is raised."""
        t0 = time.perf_counter()
        outs = [Outcome(prompt_tokens=len(s.prompt)) for s in seqs]

        async def consume() -> None:
            async with contextlib.aclosing(self.stream(seqs)) as events:
                async for i, ev in events:
                    outs[i].apply(ev)

        consumer: asyncio.Future[None] = asyncio.ensure_future(consume())
        watcher: asyncio.Future[None] = asyncio.ensure_future(wait_disconnect())
        try:
            pair: set[asyncio.Future[Any]] = {consumer, watcher}
            done, _ = await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
            if consumer not in done:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
                raise ClientClosedError("the client closed the connection before the answer was ready")
            consumer.result()
        finally:
            watcher.cancel()
        elapsed = time.perf_counter() - t0
        for seq, out in zip(seqs, outs, strict=True):
            out.seconds = elapsed
            out.ttft = (seq.t_first - seq.t_arrival) if seq.t_first else None
            out.stage_seconds = {p.name: seq.stage_seconds[k] for k, p in enumerate(self.replicas.pools)}
        return outs


def disconnected(request: Request[Any, Any, Any]) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns when the client closes the connection (ASGI
    http.disconnect; the body has been read already, so nothing else arrives)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait
