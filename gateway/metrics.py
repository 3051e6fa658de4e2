"""The gateway's Prometheus metrics (vLLM-style names, prefix tandem_), in one registry per app."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from functions.app import LATENCY_BUCKETS

# a hop's overhead is well under a millisecond on one machine: finer buckets than a call's
HOP_BUCKETS = (
    0.0001,
    0.0002,
    0.0003,
    0.0004,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.1,
)

if TYPE_CHECKING:
    from gateway.replicas import Replicas

TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("tandem_requests", "Finished API requests.", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "tandem_request_duration_seconds",
            "End-to-end request latency.",
            ["route"],
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "Arrival to first generated token.",
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "Time between generated tokens.",
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated.", registry=r)
        self.running = Gauge("tandem_sequences_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("tandem_sequences_waiting", "Sequences queued for admission.", registry=r)
        self.stage_call = Histogram(
            "tandem_stage_call_seconds",
            "Gateway-side latency of one stage call.",
            ["stage", "replica"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.hop_overhead = Histogram(
            "tandem_stage_hop_overhead_seconds",
            "One stage call's time outside the stage's ONNX session (its Server-Timing): encoding, "
            "HTTP both ways, validation, decoding.",
            ["stage"],
            registry=r,
            buckets=HOP_BUCKETS,
        )
        self.deadline_misses = Counter(
            "tandem_stage_deadline_misses",
            "Stage calls abandoned at their latency-derived deadline (the replica is marked down).",
            ["stage", "replica"],
            registry=r,
        )
        self.replays = Counter(
            "tandem_replays", "Rows replayed to rebuild a stage's KV cache.", ["stage"], registry=r
        )
        self.failovers = Counter(
            "tandem_failovers", "Rows moved to another replica after a failure.", ["stage"], registry=r
        )
        self.step_batch = Histogram(
            "tandem_step_batch_size",
            "Rows per scheduler step.",
            ["phase"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.prefill_chunks = Counter(
            "tandem_prefill_chunks",
            "Prefill calls that ran part of a prompt and chose no token (prefill_chunk).",
            registry=r,
        )
        self.cancelled = Counter(
            "tandem_sequences_cancelled", "Sequences cancelled (client went away).", registry=r
        )

    def init_stages(self, stages: list[str]) -> None:
        """Export the per-stage counters at 0 from the start, so rate() reads 0 before the first
        replay instead of nothing."""
        for name in stages:
            self.replays.labels(name)
            self.failovers.labels(name)

    def record_request(self, route: str, status: int, seconds: float | None = None) -> None:
        """One finished API request: its route template and the status it ended with (for a stream,
        the status of the error that ended it, or 200; 499 when the client went away)."""
        self.requests.labels(route, str(status)).inc()
        if seconds is not None:
            self.request_seconds.labels(route).observe(seconds)


class StageUpCollector:
    """tandem_stage_up{stage,replica}: 1 when the replica's last readiness check passed."""

    def __init__(self, replicas: Replicas):
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        m = GaugeMetricFamily(
            "tandem_stage_up", "Replica readiness (1 ready, 0 not).", labels=["stage", "replica"]
        )
        for pool in self.replicas.pools:
            for rep in pool.replicas:
                m.add_metric([pool.name, rep.node.id], 1.0 if rep.up else 0.0)
        yield m
