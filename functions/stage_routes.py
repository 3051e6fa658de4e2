"""The stage's routes: Litestar handlers (they document every route and serve them all when tracing is
on) and the fast path's infer route, each a thin call on the one functions.stage_service object.
Paths and bodies are functions.stage_api's.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from functions import protocol
from functions import stage_api as api
from functions.fastpath import FastRoute
from functions.stage_service import StageService


def stage_routes(service: StageService) -> list[Any]:
    """The Litestar route handlers of the stage, over `service`."""

    @get(api.SERVER_ROUTE, sync_to_thread=False, tags=["server"])
    def server_metadata() -> dict[str, Any]:
        """Server metadata (Open Inference Protocol v2)."""
        return service.server_metadata()

    @get(api.MODEL_ROUTE, sync_to_thread=False, tags=["model"])
    def model_metadata(model: FromPath[str]) -> dict[str, Any]:
        """Model metadata: the wire inputs and outputs of this stage."""
        return service.model_metadata(model)

    @get(api.READY_ROUTE, sync_to_thread=False, tags=["model"])
    def model_ready(model: FromPath[str]) -> dict[str, Any]:
        """200 when this stage can serve, 503 otherwise."""
        return service.model_ready(model)

    @post(api.INFER_ROUTE, status_code=200, tags=["model"])
    async def infer(model: FromPath[str], request: Request[Any, Any, Any]) -> Response[bytes]:
        """Run a batch (JSON tensors or the binary tensor extension). Any output the metadata lists
        may be asked for: the answer carries exactly those, or a 400 names the input one needs."""
        body = await request.body()
        answer = await service.infer(model, request.headers.get(protocol.HEADER), body, traced=True)
        return Response(answer.body, media_type=answer.media_type, headers=answer.headers)

    @post(api.FORK_ROUTE, status_code=200, sync_to_thread=False, tags=[api.SEQUENCES_TAG])
    def fork(model: FromPath[str], data: JSONBody[api.ForkRequest]) -> api.ForkAnswer:
        """Start new sequences where a held one is (the sequence management the gateway uses for
        `n` > 1): 409 with the held length when the parent is not held at `length`."""
        return service.fork(model, data)

    @get(api.SEQUENCES_ROUTE, sync_to_thread=False, tags=[api.SEQUENCES_TAG])
    def sequences(model: FromPath[str]) -> api.SequencesAnswer:
        """The sequences whose KV cache this stage holds, with their lengths; the bytes they take
        and the cache's budget."""
        return service.sequences(model)

    @delete(api.RELEASE_ONE_ROUTE, status_code=200, sync_to_thread=False, tags=[api.SEQUENCES_TAG])
    def release(model: FromPath[str], seq_id: FromPath[int]) -> api.ReleaseOneAnswer:
        """Free one sequence's KV cache now (idempotent: released is false when none was held)."""
        return service.release_one(model, seq_id)

    @post(api.RELEASE_ROUTE, status_code=200, sync_to_thread=False, tags=[api.SEQUENCES_TAG])
    def release_many(model: FromPath[str], data: JSONBody[api.ReleaseRequest]) -> api.ReleaseAnswer:
        """Free several sequences at once (the gateway's cancellation path)."""
        return service.release(model, data)

    return [server_metadata, model_metadata, model_ready, infer, sequences, release, release_many, fork]


def fast_routes(service: StageService) -> list[FastRoute]:
    """The per-token route straight on ASGI (functions.fastpath), served when tracing is off."""

    async def fast_infer(
        match: re.Match[str], headers: dict[str, str], body: bytes
    ) -> tuple[bytes, dict[str, str], str]:
        answer = await service.infer(match["model"], headers.get(protocol.HEADER.lower()), body, traced=False)
        return answer.body, answer.headers, answer.media_type

    return [FastRoute("POST", api.INFER_PATTERN, api.INFER_TEMPLATE, fast_infer)]
