"""The choices of one prompt (`n`, `best_of`) share its prefill: a fork parent runs the prompt but
its last token through every stage once, then each stage copies the parent's KV cache into one
sequence per choice (POST .../sequences/fork, which frees the parent), and each choice continues
with the prompt's last token as a one-position step, sampling with its own seed.

A fork that does not happen (a replica restarted or went down, the parent was evicted) costs only
time: the child believes the stage holds the parent's positions, gets a 409 on its first call and
replays its whole prompt there, as any sequence that lost its KV cache does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import numpy as np

from functions import contract
from gateway.clients import Clients
from gateway.metrics import GatewayMetrics
from gateway.replicas import Replica, Replicas
from gateway.sequence import SamplingParams, Sequence

logger = logging.getLogger("tandem.gateway")
# a parent chooses no token: greedy is the cheapest, and max_tokens 2 keeps sequence_end off
PARENT = SamplingParams(max_tokens=2, temperature=0.0)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's for the first (n = 1 stays as it was), a distinct,
    reproducible stream for each other one; None (fresh entropy) without a seed."""
    if seed is None or index == 0:
        return seed
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)
    return int(state[0]) % contract.SEED_LIMIT


class Forks:
    def __init__(
        self,
        clients: Clients,
        replicas: Replicas,
        metrics: GatewayMetrics,
        release: Callable[[int, Replica, int], None],
    ):
        self.clients, self.replicas, self.metrics = clients, replicas, metrics
        self.release = release  # (stage, replica, sequence id): free it there, in the background

    @staticmethod
    def parent_of(children: list[Sequence], parent: Sequence) -> Sequence:
        parent.children = children
        parent.t_arrival = children[0].t_arrival
        return parent

    async def fork(self, parents: list[Sequence], waiting: deque[Sequence]) -> None:
        """Fork every parent that went through the stages; their children go first in `waiting`."""
        kids = await asyncio.gather(*(self._fork(p) for p in parents))
        waiting.extendleft(reversed([c for group in kids for c in group]))

    async def _fork(self, p: Sequence) -> list[Sequence]:
        live = [c for c in p.children if not c.cancelled]
        for c in p.children:
            if c.cancelled:
                c.finish(None)
                self.metrics.cancelled.inc()
        stages = [(k, rep) for k, rep in enumerate(p.replica) if rep is not None and p.held[k] > 0]
        ok = [False] * len(stages)
        if live:
            ids = [c.id for c in live]
            ok = await asyncio.gather(
                *(
                    self.clients.fork(rep.node, self.replicas.pools[k].name, p.id, p.held[k], ids)
                    for k, rep in stages
                )
            )
            for c in live:
                c.adopt(p)
            for k in range(len(p.stage_seconds)):  # the shared prefill's time, counted once
                live[0].stage_seconds[k] += p.stage_seconds[k]
        for (k, rep), done in zip(stages, ok, strict=True):
            if not done:  # the stage frees a parent it forked; elsewhere, ask
                self.release(k, rep, p.id)
        for k, rep in p.left:
            self.release(k, rep, p.id)
        p.finish(None)
        return live
