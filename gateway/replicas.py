"""Replica health and routing: each stage has one or more replicas; a sequence sticks to one
(rendezvous hashing, so removing a replica only moves the sequences it had) and moves when it
goes down. A failed call marks a replica down at once; the health loop brings it back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field

from functions import contract
from gateway.clients import Clients
from gateway.config import GatewayConfig, Node

logger = logging.getLogger("tandem.gateway")


@dataclass
class Replica:
    node: Node
    up: bool = False
    reason: str = "not checked yet"
    # the stage calls waiting on this replica: cancelled when it is marked down (a frozen replica
    # accepts connections and never answers; its calls must not wait out the call timeout)
    calls: set[asyncio.Task[object]] = field(default_factory=set)
    abandoned: set[asyncio.Task[object]] = field(default_factory=set)

    def abandon_calls(self) -> None:
        for task in self.calls:
            if not task.done():
                self.abandoned.add(task)
                task.cancel(f"{self.node.id} is down")


@dataclass
class StagePool:
    index: int
    name: str  # "stage-1"
    replicas: list[Replica] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]

    def choose(self, seq_id: int) -> Replica | None:
        """The up replica with the highest hash for this sequence (None if none is up)."""
        live = self.up()
        if not live:
            return None
        return max(
            live, key=lambda r: hashlib.blake2b(f"{seq_id}/{r.node.id}".encode(), digest_size=8).digest()
        )

    def mark(self, replica: Replica, up: bool, reason: str) -> None:
        if replica.up != up:
            logger.warning(
                "%s replica %s is now %s (%s)", self.name, replica.node.id, "up" if up else "DOWN", reason
            )
            self.changed.set()
        replica.up, replica.reason = up, reason
        if not up:
            replica.abandon_calls()


class Replicas:
    def __init__(self, cfg: GatewayConfig, clients: Clients):
        self.cfg, self.clients = cfg, clients
        self.pools = [
            StagePool(k, contract.stage_name(k + 1), [Replica(n) for n in cfg.replicas(k)])
            for k in range(cfg.stages)
        ]
        self.tokenizer_up, self.tokenizer_reason = False, "not checked yet"

    async def check_all(self) -> None:
        async def one(pool: StagePool, r: Replica) -> None:
            ok, reason = await self.clients.ready(r.node.url)
            pool.mark(r, ok, reason)

        tasks = [one(p, r) for p in self.pools for r in p.replicas]
        _, (self.tokenizer_up, self.tokenizer_reason) = await asyncio.gather(
            asyncio.gather(*tasks), self.clients.ready(self.cfg.tokenizer_url)
        )

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # never let the health loop die
                logger.exception("health check failed")
            await asyncio.sleep(self.cfg.health_interval)

    def readiness(self) -> tuple[bool, str]:
        missing = [
            f"{p.name} has no ready replica ({'; '.join(f'{r.node.id}: {r.reason}' for r in p.replicas)})"
            for p in self.pools
            if not p.up()
        ]
        if not self.tokenizer_up:
            missing.append(f"tokenizer is not ready ({self.tokenizer_reason})")
        return (not missing, "; ".join(missing) or "ready")

    async def wait_for(self, pool: StagePool, seq_id: int, deadline: float) -> Replica | None:
        """A replica for this sequence, waiting until `deadline` (loop time) for one to come back."""
        while True:
            r = pool.choose(seq_id)
            if r is not None:
                return r
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            pool.changed.clear()
            await self.check_all()
            if pool.choose(seq_id) is None:
                try:
                    await asyncio.wait_for(pool.changed.wait(), timeout=min(left, self.cfg.health_interval))
                except TimeoutError:
                    pass
