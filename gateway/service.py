"""The gateway's running state: clients, replica health, the scheduler, and the start-up
discovery that learns the stage layout and the tokenizer from the functions themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import httpx
from opentelemetry import trace
from opentelemetry.propagate import inject
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from functions.tokenizer_core import TokenizerCore
from gateway.clients import Clients
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, InvalidRequestError, StageUnavailableError
from gateway.metrics import GatewayMetrics, StageUpCollector
from gateway.replicas import Replicas
from gateway.scheduler import Event, SamplingParams, Scheduler, Sequence, StageLayout

logger = logging.getLogger("tandem.gateway")
tracer = trace.get_tracer("tandem.gateway")


@dataclass
class Outcome:
    """A whole (non-streamed) generation."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
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
    ):
        self.cfg = cfg
        self.clients = Clients(cfg, transport)
        self.replicas = Replicas(cfg, self.clients)
        self.metrics = GatewayMetrics(registry)
        registry.register(StageUpCollector(self.replicas))
        self.scheduler: Scheduler | None = None
        self.tokenizer: TokenizerCore | None = None
        self.layout: StageLayout | None = None
        self.status = "discovering the tokenizer and stages"
        self._tasks: list[asyncio.Task] = []

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
                tok = TokenizerCore(Tokenizer.from_str(raw.decode()), eos_token_id=eos, raw_json=raw)
                metas = []
                for pool in self.replicas.pools:
                    metas.append(await self._stage_metadata(pool.name, [r.node.url for r in pool.replicas]))
                break
            except Exception as e:  # keep trying: functions may start after the gateway
                self.status = f"waiting for the functions: {e}"
                await asyncio.sleep(0.5)
        p0 = metas[0]["parameters"]
        self.layout = StageLayout(
            input_names=[m["inputs"][2]["name"] for m in metas],
            output_names=[m["outputs"][0]["name"] for m in metas if m["outputs"]],
            n_embd=int(p0["n_embd"]),
            n_positions=int(p0["n_positions"]),
            vocab_size=int(p0["vocab_size"]),
            model_id=str(p0["model_id"]),
        )
        if self.layout.output_names[-1] != "token_ids":
            raise RuntimeError(
                f"the last configured stage is not the model's last ({self.layout.output_names})"
            )
        self.tokenizer = tok
        self.scheduler = Scheduler(self.cfg, self.clients, self.replicas, self.metrics, tok, self.layout)
        self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
        self.status = "ready"
        logger.info("gateway ready: %d stages, model %s", len(metas), self.layout.model_id)

    async def _stage_metadata(self, name: str, urls: list[str]) -> dict:
        last_error = "no replica configured"
        for url in urls:
            try:
                r = await self.clients.http.get(f"{url}/v2/models/{name}", timeout=2.0)
                meta = r.json()
                if r.status_code == 200 and meta.get("inputs"):
                    return meta
                last_error = f"{url}: {r.status_code} {meta.get('detail', 'not loaded yet')}"
            except (httpx.HTTPError, ValueError) as e:
                last_error = f"{url}: {type(e).__name__}"
        raise StageUnavailableError(f"{name} metadata unavailable ({last_error})")

    def readiness(self) -> tuple[bool, str]:
        if self.scheduler is None:
            return False, self.status
        return self.replicas.readiness()

    def require_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise StageUnavailableError(f"the gateway is not ready: {self.status}")
        return self.scheduler

    # ---- helpers used by the routes ----
    async def encode(self, texts: list[str]) -> list[list[int]]:
        with tracer.start_as_current_span("tokenizer encode") as span:
            headers: dict[str, str] = {}
            inject(headers)
            ids = await self.clients.encode(texts, headers)
            span.set_attribute("gen_ai.usage.input_tokens", sum(len(i) for i in ids))
        return ids

    def check_prompt(self, ids: list[int], max_tokens: int, top_k: int = 0, param: str = "prompt") -> None:
        self.require_scheduler()
        assert self.layout is not None  # set together with the scheduler
        if top_k > self.layout.vocab_size:
            raise InvalidRequestError(
                f"top_k must be at most the vocabulary size {self.layout.vocab_size}", param="top_k"
            )
        if not ids:
            raise InvalidRequestError("the prompt is empty: it must contain at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < self.layout.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.layout.vocab_size})", param=param
            )
        if len(ids) + max_tokens > self.layout.n_positions:
            raise InvalidRequestError(
                f"this model's context window is {self.layout.n_positions} tokens; the prompt has {len(ids)} "
                f"and max_tokens asks for {max_tokens} more ({len(ids) + max_tokens}); shorten one",
                param="max_tokens",
            )

    async def collect(self, seq: Sequence, wait_disconnect) -> Outcome:
        """Run a sequence to the end, cancelling it if the client goes away first."""
        sched = self.require_scheduler()
        out = Outcome(prompt_tokens=len(seq.prompt))
        t0 = time.perf_counter()

        async def consume() -> None:
            async for ev in sched.stream(seq):
                self._apply(out, ev)

        consumer = asyncio.create_task(consume())
        watcher = asyncio.create_task(wait_disconnect())
        try:
            done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if consumer not in done:
                sched.cancel(seq)
                consumer.cancel()
                raise asyncio.CancelledError("client disconnected")
            consumer.result()
        finally:
            watcher.cancel()
        out.seconds = time.perf_counter() - t0
        out.ttft = (seq.t_first - seq.t_arrival) if seq.t_first else None
        out.stage_seconds = {p.name: seq.stage_seconds[k] for k, p in enumerate(self.replicas.pools)}
        return out

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
        else:
            out.finish_reason = ev.finish_reason


def sampling_from(
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: list[str],
    ignore_eos: bool,
    logprobs: bool,
) -> SamplingParams:
    """Validated sampling parameters (the stage re-checks them; here they get a friendly 400)."""
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if not 0 <= temperature <= 100:
        raise InvalidRequestError(
            f"temperature must be between 0 and 100, got {temperature}", param="temperature"
        )
    if not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if top_k < -1:
        raise InvalidRequestError(f"top_k must be -1 or 0 (off) or positive, got {top_k}", param="top_k")
    if len(stop) > 4 or any(not isinstance(s, str) or s == "" for s in stop):
        raise InvalidRequestError("stop takes up to 4 non-empty strings", param="stop")
    if seed is not None and not 0 <= seed < 2**62:
        raise InvalidRequestError("seed must be in [0, 2**62)", param="seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )


def disconnected(request):
    """A coroutine function that returns when the client closes the connection (ASGI
    http.disconnect; the body has been read already, so nothing else arrives)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


__all__ = ["Gateway", "GatewayError", "Outcome", "disconnected", "sampling_from"]
