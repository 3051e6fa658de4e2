"""The stage's one service object (KServe's DataPlane idea): every stage route, whether Litestar
serves it (functions.stage_routes) or the ASGI fast path does (functions.fastpath), is a thin call
here: decode -> engine -> encode. It knows the loader (and so the engine once loaded), the stage's
metrics and its tracer; no HTTP framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import numpy as np

from functions import protocol
from functions import stage_api as api
from functions.bundle import Manifest
from functions.engine import StageEngine, StageResult
from functions.errors import BadRequestError, NotFoundError, NotReadyError
from functions.stage_state import Loader, StageMetrics, StageSettings
from functions.telemetry import get_tracer

INLINE_POSITIONS = 64  # batches up to this many new positions run on the event loop itself


@dataclass(frozen=True)
class InferAnswer:
    body: bytes
    headers: dict[str, str]
    media_type: str


class StageService:
    """What the stage answers, route by route, for the one model it serves."""

    def __init__(self, settings: StageSettings, manifest: Manifest, loader: Loader, metrics: StageMetrics):
        self.settings, self.manifest, self.loader, self.metrics = settings, manifest, loader, metrics
        self.entry = manifest.stage(settings.stage)
        self.name = self.entry.name
        self.tracer = get_tracer("tandem.stage")

    def engine_for(self, model: str) -> StageEngine:
        self._check_model(model)
        if self.loader.engine is None:
            raise NotReadyError(f"{self.name} is not ready: {self.loader.ready()[1]}")
        return self.loader.engine

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise NotFoundError(f"model {model!r} is not served here; this function serves {self.name!r}")

    # ---- metadata (Open Inference Protocol) ----
    @staticmethod
    def server_metadata() -> dict[str, Any]:
        return {"name": "tandem-stage", "version": "0.1.0", "extensions": list(api.EXTENSIONS)}

    def model_metadata(self, model: str) -> dict[str, Any]:
        """The wire inputs and outputs of this stage (empty until the session is loaded)."""
        self._check_model(model)
        e, m = self.loader.engine, self.manifest
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": e.io.wire_inputs() if e else [],
            "outputs": e.io.wire_outputs() if e else [],
            "parameters": {
                "layers": self.entry.layers,
                "model_id": m.model["id"],
                "family": m.family,
                "hidden_size": m.hidden_size,
                "max_positions": m.max_positions,
                "vocab_size": m.vocab_size,
                "num_kv_heads": m.num_kv_heads,
                "head_dim": m.head_dim,
                "providers": e.providers if e else [],  # what the session runs on, CPU fallback shown
                "kv_store": e.kv.kind if e else None,  # host | device (functions.kvstore)
                "max_batch_tokens": self.settings.max_batch_tokens,  # rows x new positions per call
                # rows x (past + new) positions per call: the KV cache budget (None until loaded)
                "max_call_positions": e.max_call_positions if e else None,
            },
        }

    def model_ready(self, model: str) -> dict[str, Any]:
        self.engine_for(model)
        return {"name": self.name, "ready": True}

    # ---- infer ----
    async def infer(self, model: str, header_length: str | None, body: bytes, traced: bool) -> InferAnswer:
        """One batch: decode the request, check and run it, encode exactly the outputs asked for."""
        engine = self.engine_for(model)
        req = protocol.decode_request(body, _header_length(header_length))
        want = req.output_names()
        if traced:
            with self.tracer.start_as_current_span(f"{self.name} infer") as span:
                result = await _compute(engine, req.inputs, want)
                span.set_attribute("tandem.batch_size", result.batch_size)
                span.set_attribute("tandem.phase", result.phase)
        else:  # even a no-op span costs ~0.1 ms here, three times per token
            result = await _compute(engine, req.inputs, want)
        self.metrics.observe(result)
        binary = req.binary_output_names(result.outputs)
        out, hlen = protocol.encode_response(self.name, result.outputs, binary=binary, request_id=req.id)
        # the time in the session, so that a caller can tell its own overhead from the model's
        timing = {"Server-Timing": f"infer;dur={result.seconds * 1000:.3f}"}
        if hlen is None:
            return InferAnswer(out, timing, "application/json")
        return InferAnswer(out, {protocol.HEADER: str(hlen), **timing}, "application/octet-stream")

    # ---- sequences ----
    def fork(self, model: str, req: api.ForkRequest) -> api.ForkAnswer:
        """Children that start where a held sequence is; 409 when it is not held at `length`."""
        engine = self.engine_for(model)
        kids = req.children
        if not 1 <= len(kids) <= api.MAX_FORK or len(set(kids)) != len(kids) or req.parent in kids:
            raise BadRequestError(
                f"children must be 1 to {api.MAX_FORK} distinct sequence ids other than the parent's"
            )
        if req.length < 1:
            raise BadRequestError(f"length must be at least 1, got {req.length}")
        engine.fork(req.parent, req.length, kids, req.release)
        self.metrics.forks.inc(len(kids))
        return api.ForkAnswer(req.parent, kids, req.length)

    def sequences(self, model: str) -> api.SequencesAnswer:
        engine = self.engine_for(model)
        held = {str(s): n for s, n in engine.held().items()}
        return api.SequencesAnswer(held, engine.cache.bytes, engine.cache.max_bytes)

    def release_one(self, model: str, seq_id: int) -> api.ReleaseOneAnswer:
        return api.ReleaseOneAnswer(self.engine_for(model).release(seq_id))

    def release(self, model: str, req: api.ReleaseRequest) -> api.ReleaseAnswer:
        engine = self.engine_for(model)
        return api.ReleaseAnswer([s for s in req.sequence_ids if engine.release(s)])

    def expire_idle(self) -> None:
        """Drop the sequences idle past the timeout (a background task calls this)."""
        engine = self.loader.engine
        if engine is not None:
            with engine.lock:
                engine.cache.expire()


def _header_length(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        raise BadRequestError(f"{protocol.HEADER} must be an integer, got {raw!r}") from None


async def _compute(engine: StageEngine, inputs: dict[str, np.ndarray], want: list[str] | None) -> StageResult:
    x = inputs.get(engine.x_name)
    if x is not None and x.ndim >= 2 and x.shape[0] * x.shape[1] <= INLINE_POSITIONS:
        # a decode-sized batch takes a few ms: a thread hop would cost more than it saves
        return engine.infer(inputs, want)
    # a prefill can take seconds: keep the event loop (health, metrics) answering
    return await anyio.to_thread.run_sync(engine.infer, inputs, want)
