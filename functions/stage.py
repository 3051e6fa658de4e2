"""The stage function: one ONNX pipeline stage behind the Open Inference Protocol v2 REST API.

Run: `python -m functions.stage --bundle DIR --stage K [--port P] [--provider cpu|cuda] [--threads N]`.
The session loads in the background after the port opens; /v2/health/ready is 503 until a
warm-up inference has run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
from litestar import Litestar, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody
from prometheus_client import CollectorRegistry, Counter, Histogram

from functions import protocol
from functions.app import LATENCY_BUCKETS, create_function_app
from functions.bundle import BundleError, load_manifest
from functions.bundle_fetch import prepare_bundle
from functions.device import ProviderError, require_available
from functions.engine import StageEngine, StageResult
from functions.errors import BadRequestError, NotFoundError, NotReadyError
from functions.fastpath import ASGIApp, FastRoute
from functions.process import serve
from functions.settings import FunctionSettings, SettingsError
from functions.stage_state import PROVIDERS, CacheCollector, DeviceCollector, Loader, StageSettings
from functions.telemetry import get_tracer

logger = logging.getLogger("tandem.stage")
DEFAULT_PORT_BASE = 8100  # stage K listens on 8100 + K by default
INLINE_POSITIONS = 64  # batches up to this many new positions run on the event loop itself
INFER_TEMPLATE = "/v2/models/{model}/infer"  # as Litestar names the route in metrics
MAX_FORK = 256  # children per fork call (n and best_of are at most 128 per prompt)


class ReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    sequence_ids: list[int]


class ForkRequest(msgspec.Struct, forbid_unknown_fields=True):
    parent: int  # the held sequence to fork
    length: int  # positions the caller believes it holds (a 409 when it does not)
    children: list[int]  # new sequence ids, each starting with a copy of the parent's KV cache
    release: bool = True  # free the parent once forked


def create_stage_app(
    settings: StageSettings,
    fn_settings: FunctionSettings,
    *,
    fast_path: bool | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> ASGIApp:
    """The stage function's ASGI app; `fast_path` as in `create_function_app` (None: auto);
    `on_fatal` is called with a one-line reason when the stage can never become ready (the CUDA
    provider asked for is not what the session got; None: readiness reports it)."""
    manifest = load_manifest(settings.bundle)
    entry = manifest.stage(settings.stage)
    name = entry.name
    loader = Loader(settings, manifest, on_fatal)
    registry = CollectorRegistry()
    infer_seconds = Histogram(
        "tandem_stage_infer_seconds",
        "Time in the ONNX session per batch.",
        ["stage", "phase"],
        registry=registry,
        buckets=LATENCY_BUCKETS,
    )
    batch_size = Histogram(
        "tandem_stage_batch_size",
        "Rows per inference batch.",
        ["stage"],
        registry=registry,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    )
    forks = Counter(
        "tandem_stage_forked_sequences",
        "Sequences started as a copy of another's KV cache (the choices of one prompt share its prefill).",
        ["stage"],
        registry=registry,
    )
    # label lookups once, not per call (each takes a lock and a dict lookup)
    infer_child = {phase: infer_seconds.labels(name, phase) for phase in ("prefill", "decode")}
    batch_child = batch_size.labels(name)
    registry.register(CacheCollector(loader, name))
    registry.register(DeviceCollector(loader, name))
    tracer = get_tracer("tandem.stage")

    def engine_for(model: str) -> StageEngine:
        if model != name:
            raise NotFoundError(f"model {model!r} is not served here; this function serves {name!r}")
        if loader.engine is None:
            raise NotReadyError(f"{name} is not ready: {loader.ready()[1]}")
        return loader.engine

    @get("/v2", sync_to_thread=False, tags=["server"])
    def server_metadata() -> dict[str, Any]:
        """Server metadata (Open Inference Protocol v2)."""
        return {"name": "tandem-stage", "version": "0.1.0", "extensions": ["binary_tensor_data", "sequences"]}

    @get("/v2/models/{model:str}", sync_to_thread=False, tags=["model"])
    def model_metadata(model: FromPath[str]) -> dict[str, Any]:
        """Model metadata: the wire inputs and outputs of this stage."""
        if model != name:
            raise NotFoundError(f"model {model!r} is not served here; this function serves {name!r}")
        e = loader.engine
        return {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": e.wire_inputs() if e else [],
            "outputs": e.wire_outputs() if e else [],
            "parameters": {
                "layers": entry.layers,
                "model_id": manifest.model["id"],
                "family": manifest.family,
                "hidden_size": manifest.hidden_size,
                "max_positions": manifest.max_positions,
                "vocab_size": manifest.vocab_size,
                "num_kv_heads": manifest.num_kv_heads,
                "head_dim": manifest.head_dim,
                "providers": e.providers if e else [],  # what the session runs on, CPU fallback shown
                "kv_store": e.kv.kind if e else None,  # host | device (functions.kvstore)
                "max_batch_tokens": settings.max_batch_tokens,  # rows x new positions per call
                # rows x (past + new) positions per call: the KV cache budget (None until loaded)
                "max_call_positions": e.max_call_positions if e else None,
            },
        }

    @get("/v2/models/{model:str}/ready", sync_to_thread=False, tags=["model"])
    def model_ready(model: FromPath[str]) -> dict[str, Any]:
        """200 when this stage can serve, 503 otherwise."""
        engine_for(model)
        return {"name": name, "ready": True}

    async def compute(engine: StageEngine, inputs: dict[str, Any], want: set[str] | None) -> StageResult:
        x = inputs.get(engine.x_name)
        if x is not None and x.ndim >= 2 and x.shape[0] * x.shape[1] <= INLINE_POSITIONS:
            # a decode-sized batch takes a few ms: a thread hop would cost more than it saves
            return engine.infer(inputs, want)
        # a prefill can take seconds: keep the event loop (health, metrics) answering
        return await anyio.to_thread.run_sync(engine.infer, inputs, want)

    async def run_infer(
        model: str, raw_header_len: str | None, body: bytes, traced: bool
    ) -> tuple[bytes, dict[str, str], str]:
        engine = engine_for(model)
        try:
            header_len = int(raw_header_len) if raw_header_len is not None else None
        except ValueError:
            raise BadRequestError(f"{protocol.HEADER} must be an integer, got {raw_header_len!r}") from None
        req = protocol.decode_request(body, header_len)
        want = {o.name for o in req.outputs} or None
        if want is not None:  # refuse before inferring: a refused request changes nothing
            known = engine.io.output_names
            if not want <= known:
                raise BadRequestError(
                    f"unknown output(s) {sorted(want - known)}; {name} returns {sorted(known)}"
                )
        if traced:
            with tracer.start_as_current_span(f"{name} infer") as span:
                result = await compute(engine, req.inputs, want)
                span.set_attribute("tandem.batch_size", result.batch_size)
                span.set_attribute("tandem.phase", result.phase)
        else:  # even a no-op span costs ~0.1 ms here, three times per token
            result = await compute(engine, req.inputs, want)
        infer_child[result.phase].observe(result.seconds)
        batch_child.observe(result.batch_size)
        outputs = result.outputs if want is None else {k: v for k, v in result.outputs.items() if k in want}
        binary = req.binary_output_names(outputs)
        out, hlen = protocol.encode_response(name, outputs, binary=binary, request_id=req.id)
        # the time in the session, so that a caller can tell its own overhead from the model's
        timing = {"Server-Timing": f"infer;dur={result.seconds * 1000:.3f}"}
        if hlen is None:
            return out, timing, "application/json"
        return out, {protocol.HEADER: str(hlen), **timing}, "application/octet-stream"

    @post("/v2/models/{model:str}/infer", status_code=200, tags=["model"])
    async def infer(model: FromPath[str], request: Request[Any, Any, Any]) -> Response[bytes]:
        """Run a batch (JSON tensors or the binary tensor extension)."""
        out, headers, media = await run_infer(
            model, request.headers.get(protocol.HEADER), await request.body(), traced=True
        )
        return Response(out, media_type=media, headers=headers)

    async def fast_infer(
        match: re.Match[str], headers: dict[str, str], body: bytes
    ) -> tuple[bytes, dict[str, str], str]:
        # served only when tracing is off (functions.fastpath)
        return await run_infer(match["model"], headers.get(protocol.HEADER.lower()), body, traced=False)

    @post("/v2/models/{model:str}/sequences/fork", status_code=200, sync_to_thread=False, tags=["sequences"])
    def fork(model: FromPath[str], data: JSONBody[ForkRequest]) -> dict[str, Any]:
        """Start new sequences where a held one is (the sequence management the gateway uses for
        `n` > 1): 409 with the held length when the parent is not held at `length`."""
        engine = engine_for(model)
        kids = data.children
        if not 1 <= len(kids) <= MAX_FORK or len(set(kids)) != len(kids) or data.parent in kids:
            raise BadRequestError(
                f"children must be 1 to {MAX_FORK} distinct sequence ids other than the parent's"
            )
        if data.length < 1:
            raise BadRequestError(f"length must be at least 1, got {data.length}")
        engine.fork(data.parent, data.length, kids, data.release)
        forks.labels(name).inc(len(kids))
        return {"parent": data.parent, "children": kids, "length": data.length}

    @get("/v2/models/{model:str}/sequences", sync_to_thread=False, tags=["sequences"])
    def sequences(model: FromPath[str]) -> dict[str, Any]:
        """The sequences whose KV cache this stage holds, with their lengths; the bytes they take
        and the cache's budget."""
        engine = engine_for(model)
        held = {str(s): n for s, n in engine.held().items()}
        return {"sequences": held, "bytes": engine.cache.bytes, "capacity_bytes": engine.cache.max_bytes}

    @delete(
        "/v2/models/{model:str}/sequences/{seq_id:int}",
        status_code=200,
        sync_to_thread=False,
        tags=["sequences"],
    )
    def release(model: FromPath[str], seq_id: FromPath[int]) -> dict[str, Any]:
        """Free one sequence's KV cache now (idempotent: released is false when none was held)."""
        return {"released": engine_for(model).release(seq_id)}

    @post(
        "/v2/models/{model:str}/sequences/release", status_code=200, sync_to_thread=False, tags=["sequences"]
    )
    def release_many(model: FromPath[str], data: JSONBody[ReleaseRequest]) -> dict[str, Any]:
        """Free several sequences at once (the gateway's cancellation path)."""
        engine = engine_for(model)
        return {"released": [s for s in data.sequence_ids if engine.release(s)]}

    @contextlib.asynccontextmanager
    async def load_in_background(app: Litestar) -> AsyncIterator[None]:
        threading.Thread(target=loader.run, name=f"load-{name}", daemon=True).start()
        expiry = asyncio.create_task(expire_idle())
        try:
            yield
        finally:
            expiry.cancel()

    async def expire_idle() -> None:
        """Idle sequences leave even when no request comes to trigger it."""
        interval = max(1.0, min(30.0, settings.idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            engine = loader.engine
            if engine is not None:
                with engine.lock:
                    engine.cache.expire()

    return create_function_app(
        service_name=name,
        route_handlers=[
            server_metadata,
            model_metadata,
            model_ready,
            infer,
            sequences,
            release,
            release_many,
            fork,
        ],
        settings=fn_settings,
        lifespan=[load_in_background],
        is_ready=loader.ready,
        registry=registry,
        openapi_title=f"tandem {name}",
        state={"loader": loader},
        # the per-token route, straight on ASGI (functions.fastpath); the Litestar route above
        # documents it and serves it when tracing is on
        fast_routes=[
            FastRoute("POST", re.compile(r"/v2/models/(?P<model>[^/]+)/infer"), INFER_TEMPLATE, fast_infer)
        ],
        fast_path=fast_path,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m functions.stage", description=__doc__)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--stage", required=True, help="stage number (1-based) or name, e.g. 2 or stage-2")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument("--provider", choices=PROVIDERS)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    args = p.parse_args(argv)
    try:
        settings = StageSettings.from_env(
            bundle=args.bundle, stage=args.stage, provider=args.provider, threads=args.threads
        )
        require_available(settings.provider)  # before the port opens: CUDA asked for, none installed
        # fetched when TANDEM_BUNDLE_URL says so; a bundle in place is verified by the loader
        prepare_bundle(settings.bundle, settings.stage, verify_in_place=False)
        manifest = load_manifest(settings.bundle)
        index = manifest.stage(settings.stage).index
        fn = FunctionSettings.from_env(DEFAULT_PORT_BASE + index + 1, port=args.port, host=args.host)
        app = create_stage_app(settings, fn, on_fatal=exit_at_once)
    except (BundleError, SettingsError, ProviderError) as e:
        print(f"stage: error: {e}", file=sys.stderr)
        return 2
    return serve(app, fn)


def exit_at_once(reason: str) -> None:
    """The session came up without the provider asked for: say why in one line and end the
    process (the loader thread runs before the stage was ever ready, so no request is in flight)."""
    print(f"stage: error: {reason}", file=sys.stderr, flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
