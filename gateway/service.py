"""The gateway's running state: clients, replica health, the scheduler, and the start-up
discovery that learns the stage layout and the tokenizer from the functions themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from litestar import Request
from opentelemetry import trace
from opentelemetry.propagate import inject
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from functions import contract
from functions.tokenizer_core import TokenizerCore
from gateway.clients import Clients, StagePoster
from gateway.config import GatewayConfig, Node
from gateway.errors import (
    ClientClosedError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    StageUnavailableError,
)
from gateway.metrics import GatewayMetrics, StageUpCollector
from gateway.params import sampling_from
from gateway.pipeline import Pipeline, StageLayout
from gateway.replicas import Replicas
from gateway.scheduler import Scheduler
from gateway.sequence import Event, SamplingParams, Sequence, Top
from gateway.tracing import annotate_request, annotate_response

logger = logging.getLogger("tandem.gateway")
tracer = trace.get_tracer("tandem.gateway")


@dataclass
class Outcome:
    """A whole (non-streamed) generation."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    tops: list[Top | None] = field(default_factory=list)  # per token: its alternatives, when asked
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seconds: float = 0.0
    ttft: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Gateway:
    def __init__(
        self,
        cfg: GatewayConfig,
        registry: CollectorRegistry,
        transport: httpx.AsyncBaseTransport | None = None,
        poster: StagePoster | None = None,
        *,
        auth_token: str | None = None,
    ):
        self.cfg = cfg
        self.clients = Clients(cfg, transport, poster, auth_token=auth_token)
        self.replicas = Replicas(cfg, self.clients)
        self.metrics = GatewayMetrics(registry)
        self.metrics.init_stages([p.name for p in self.replicas.pools])
        registry.register(StageUpCollector(self.replicas))
        self.scheduler: Scheduler | None = None
        self.tokenizer: TokenizerCore | None = None
        self.layout: StageLayout | None = None
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
                raw, eos = await self.clients.tokenizer_json()
                tok = TokenizerCore(Tokenizer.from_str(raw.decode()), eos_token_ids=eos, raw_json=raw)
                metas = []
                for pool in self.replicas.pools:
                    metas.append(await self._stage_metadata(pool.name, [r.node for r in pool.replicas]))
                break
            except Exception as e:  # keep trying: functions may start after the gateway
                self.status = f"waiting for the functions: {e}"
                await asyncio.sleep(0.5)
        p0 = metas[0]["parameters"]
        self.layout = StageLayout(
            input_names=[contract.data_input([t["name"] for t in m["inputs"]]) for m in metas],
            output_names=[m["outputs"][0]["name"] for m in metas if m["outputs"]],
            hidden_size=int(p0["hidden_size"]),
            max_positions=int(p0["max_positions"]),
            vocab_size=int(p0["vocab_size"]),
            model_id=str(p0["model_id"]),
            max_batch_tokens=min(int(m["parameters"].get("max_batch_tokens", 1 << 62)) for m in metas),
            max_call_positions=min(int(m["parameters"].get("max_call_positions") or 1 << 62) for m in metas),
            scoring=contract.TARGET_IDS in {t["name"] for t in metas[-1]["inputs"]},
        )
        if self.layout.output_names[-1] != contract.TOKEN_IDS:
            raise RuntimeError(
                f"the last configured stage is not the model's last ({self.layout.output_names})"
            )
        self.tokenizer = tok
        pipeline = Pipeline(
            self.cfg, self.clients, self.replicas, self.metrics, self.layout, tok.eos_token_ids
        )
        self.scheduler = Scheduler(self.cfg, self.clients, self.replicas, self.metrics, tok, pipeline)
        self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
        self.status = "ready"
        logger.info("gateway ready: %d stages, model %s", len(metas), self.layout.model_id)

    async def _stage_metadata(self, name: str, nodes: list[Node]) -> dict[str, Any]:
        last_error = "no replica configured"
        for node in nodes:  # errors name the replica by id: addresses stay out of /readyz
            try:
                r = await self.clients.http.get(f"{node.url}/v2/models/{name}", timeout=2.0)
                meta: dict[str, Any] = r.json()
                if r.status_code == 200 and meta.get("inputs"):
                    return meta
                last_error = f"{node.id}: {r.status_code} {meta.get('detail', 'not loaded yet')}"
            except (httpx.HTTPError, ValueError) as e:
                last_error = f"{node.id}: {type(e).__name__}"
        raise StageUnavailableError(f"{name} metadata unavailable ({last_error})")

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

    async def encode(self, texts: list[str]) -> list[list[int]]:
        with tracer.start_as_current_span("tokenizer encode") as span:
            headers: dict[str, str] = {}
            inject(headers)
            ids = await self.clients.encode(texts, headers)
            span.set_attribute("gen_ai.usage.input_tokens", sum(len(i) for i in ids))
        return ids

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        layout = self.layout
        if layout is None:
            raise StageUnavailableError(f"the gateway is not ready: {self.status}")
        if any(not 0 <= t < layout.vocab_size for t, _ in params.logit_bias):
            raise InvalidRequestError(
                f"logit_bias names a token id outside the vocabulary [0, {layout.vocab_size})",
                param="logit_bias",
            )
        if params.top_k > layout.vocab_size:
            raise InvalidRequestError(
                f"top_k must be at most the vocabulary size {layout.vocab_size}", param="top_k"
            )
        if not ids:
            raise InvalidRequestError(f"{param} is empty: it must contain at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < layout.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {layout.vocab_size})", param=param
            )
        if len(ids) > layout.max_batch_tokens:
            raise PayloadTooLargeError(
                f"the prompt has {len(ids)} tokens; the stages take at most {layout.max_batch_tokens} "
                "positions per call (TANDEM_MAX_BATCH_TOKENS)",
                param=param,
            )
        if len(ids) + params.max_tokens > layout.max_call_positions:
            raise PayloadTooLargeError(
                f"the prompt ({len(ids)} tokens) and max_tokens ({params.max_tokens}) need "
                f"{len(ids) + params.max_tokens} cached positions; the smallest stage KV cache holds "
                f"{layout.max_call_positions} (TANDEM_KV_CACHE_BYTES)",
                param="max_tokens",
            )
        if len(ids) + params.max_tokens > layout.max_positions:
            raise InvalidRequestError(
                f"this model's context window is {layout.max_positions} tokens; the prompt has {len(ids)} "
                f"and max_tokens asks for {params.max_tokens} more ({len(ids) + params.max_tokens}); "
                "shorten one",
                param="max_tokens",
            )

    async def collect(
        self, seqs: list[Sequence], wait_disconnect: Callable[[], Awaitable[None]]
    ) -> list[Outcome]:
        """Run sequences to the end; if the client goes away first, cancel them all and raise
        ClientClosedError (the route's error handler counts it as 499)."""
        sched = self.require_scheduler()
        t0 = time.perf_counter()
        outs = [Outcome(prompt_tokens=len(s.prompt)) for s in seqs]

        async def consume(seq: Sequence, out: Outcome) -> None:
            async for ev in sched.stream(seq):
                self._apply(out, ev)

        consumer: asyncio.Future[list[None]] = asyncio.ensure_future(
            asyncio.gather(*(consume(s, o) for s, o in zip(seqs, outs, strict=True)))
        )
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
            for s in seqs:
                sched.cancel(s)  # a no-op for finished ones; frees the rest after an error
        elapsed = time.perf_counter() - t0
        for seq, out in zip(seqs, outs, strict=True):
            out.seconds = elapsed
            out.ttft = (seq.t_first - seq.t_arrival) if seq.t_first else None
            out.stage_seconds = {p.name: seq.stage_seconds[k] for k, p in enumerate(self.replicas.pools)}
        return outs

    @staticmethod
    def _apply(out: Outcome, ev: Event) -> None:
        if ev.kind == "error":
            assert ev.error is not None
            raise ev.error
        if ev.kind == "token":
            out.token_ids.append(ev.token_id)
            out.text += ev.text
            if ev.logprob is not None:
                out.logprobs.append(ev.logprob)
            out.tops.append(ev.top)
        else:
            out.finish_reason = ev.finish_reason


def disconnected(request: Request[Any, Any, Any]) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns when the client closes the connection (ASGI
    http.disconnect; the body has been read already, so nothing else arrives)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


__all__ = [
    "Gateway",
    "GatewayError",
    "Outcome",
    "disconnected",
    "sampling_from",
]  # sampling_from: gateway.params
