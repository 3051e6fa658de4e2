"""GET /api/nodes: every stage's replicas as the gateway sees them (up or down and why, from the
health loop in gateway.replicas) with the KV cache each one holds, for the UI's node health panel,
and whether the gateway traces (the UI shows a trace link only then).

The KV figures come from each replica's sequence listing (functions.stage_api), asked in parallel
through gateway.clients with a short timeout and no retry, on the control-plane httpx client (the
per-token calls use their own connections, gateway.wire), so a slow or dead replica costs this route
about KV_TIMEOUT_S and never holds up generation; such a replica is listed with its health and
`kv: null` plus why.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request, get

from gateway.clients import Clients
from gateway.errors import StageError, StageTimeoutError, StageUnavailableError
from gateway.replicas import Replica
from gateway.service import Gateway

KV_TIMEOUT_S = 0.5


class KVUse(msgspec.Struct):
    sequences: int  # sequences whose keys/values the replica holds
    bytes: int  # bytes they take
    capacity_bytes: int | None  # the replica's budget (TANDEM_KV_CACHE_BYTES); None if not reported


class ReplicaStatus(msgspec.Struct):
    id: str
    address: str
    up: bool
    reason: str  # "ready", or why the last readiness check failed
    kv: KVUse | None
    kv_error: str | None = None  # why `kv` is missing


class StageStatus(msgspec.Struct):
    name: str
    replicas: list[ReplicaStatus]


class ServiceStatus(msgspec.Struct):
    up: bool
    reason: str


class NodesStatus(msgspec.Struct):
    model: str
    ready: bool
    reason: str
    tokenizer: ServiceStatus
    stages: list[StageStatus]
    tracing: bool  # the gateway exports traces (OTEL_*): the UI links a request's trace only then


async def kv_use(clients: Clients, stage: str, replica: Replica) -> tuple[KVUse | None, str | None]:
    """One replica's KV cache use, or None and the reason it could not be read."""
    try:
        held = await clients.sequences(replica.node, stage, KV_TIMEOUT_S)
    except StageTimeoutError:
        return None, f"no answer within {KV_TIMEOUT_S} s"
    except StageUnavailableError as e:
        return None, f"unreachable ({type(e.__cause__ or e).__name__})"
    except StageError as e:
        return None, str(e)
    return KVUse(len(held.sequences), held.bytes, held.capacity_bytes), None


@get("/api/nodes", tags=["nodes"])
async def nodes(request: Request[Any, Any, Any]) -> NodesStatus:
    """Every stage's replicas: up or down (the gateway's last health check, and why), and the KV
    cache each holds (asked now, with a short timeout; `kv` is null with `kv_error` when a replica
    did not answer). The UI's node health panel polls this."""
    gw: Gateway = request.app.state.gateway
    pools = gw.replicas.pools
    kv = await asyncio.gather(*(kv_use(gw.clients, p.name, r) for p in pools for r in p.replicas))
    figures = iter(kv)
    stages = [
        StageStatus(
            p.name,
            [ReplicaStatus(r.node.id, r.node.address, r.up, r.reason, *next(figures)) for r in p.replicas],
        )
        for p in pools
    ]
    ready, reason = gw.readiness()
    tok = ServiceStatus(gw.replicas.tokenizer_up, gw.replicas.tokenizer_reason)
    return NodesStatus(gw.cfg.model_name, ready, reason, tok, stages, gw.tracing)
