"""The default Grafana dashboard, built from the panel list below into dashboards/tandem.json.

Run `python -m observability.grafana.dashboard` after editing; tests/observability checks that the
committed JSON is what this builds, that it is well formed, and that every query returns data from
a real Prometheus scraping a real stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "tandem.json"
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/datasources.yml
JAEGER_UID = "jaeger"
RATE = "$__rate_interval"  # Grafana's window for rate(): at least 4 scrape intervals
WIDTH, HEIGHT = 12, 8  # two panels per row on Grafana's 24-column grid


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[tuple[str, str], ...]  # (legend, PromQL)
    unit: str
    kind: str = "timeseries"


def quantiles(histogram: str, by: str = "", label: str = "") -> tuple[tuple[str, str], ...]:
    """p50, p95 and p99 of a histogram (`histogram` without `_bucket`), grouped by `by`."""
    group = f"le, {by}" if by else "le"
    return tuple(
        (f"{label}p{q}", f"histogram_quantile(0.{q}, sum by ({group}) (rate({histogram}_bucket[{RATE}])))")
        for q in ("50", "95", "99")
    )


def rate(metric: str, by: str, legend: str, selector: str = "") -> tuple[str, str]:
    return legend, f"sum by ({by}) (rate({metric}{selector}[{RATE}]))"


def mean(histogram: str, by: str, legend: str) -> tuple[str, str]:
    """The mean of a histogram's observations per `by` group."""
    return legend, (
        f"sum by ({by}) (rate({histogram}_sum[{RATE}])) / sum by ({by}) (rate({histogram}_count[{RATE}]))"
    )


# The original system's seven panels.
OVERVIEW = (
    Panel(
        "API request latency",
        "End-to-end latency of the gateway's API requests (tandem_request_duration_seconds), by route.",
        quantiles("tandem_request_duration_seconds", "route", "{{route}} "),
        "s",
    ),
    Panel(
        "Model inference latency by node",
        "Time in each stage's ONNX Runtime session per batch, p95 (tandem_stage_infer_seconds).",
        (
            (
                "{{stage}} {{instance}} {{phase}}",
                f"histogram_quantile(0.95, sum by (le, stage, instance, phase) "
                f"(rate(tandem_stage_infer_seconds_bucket[{RATE}])))",
            ),
        ),
        "s",
    ),
    Panel(
        "Tokenizer operations",
        "Tokenizer operations and tokens per second (tandem_tokenizer_requests_total, _tokens_total).",
        (
            rate("tandem_tokenizer_requests_total", "op", "{{op}} ops/s"),
            rate("tandem_tokenizer_tokens_total", "op", "{{op}} tokens/s"),
        ),
        "ops",
    ),
    Panel(
        "Memory usage",
        "Resident memory of every process (process_resident_memory_bytes); a stage's includes its "
        "ONNX Runtime session and KV cache.",
        (("{{job}} {{instance}}", "sum by (job, instance) (process_resident_memory_bytes)"),),
        "bytes",
    ),
    Panel(
        "Request success/error rates",
        "Finished API requests per second by route and status (tandem_requests_total), and the "
        "functions' 4xx/5xx answers (tandem_http_requests_total).",
        (
            rate("tandem_requests_total", "route, status", "{{route}} {{status}}"),
            rate(
                "tandem_http_requests_total",
                "service, status",
                "{{service}} {{status}}",
                '{job!="gateway", status=~"[45].."}',
            ),
        ),
        "reqps",
    ),
    Panel(
        "Token counts",
        "Prompt tokens processed and tokens generated per second.",
        (
            ("prompt", f"sum(rate(tandem_prompt_tokens_total[{RATE}]))"),
            ("generated", f"sum(rate(tandem_generation_tokens_total[{RATE}]))"),
        ),
        "short",
    ),
    Panel(
        "Node health status",
        "1 when up: each scraped process (up) and each stage replica as the gateway's readiness checks "
        "see it (tandem_stage_up).",
        (
            ("{{job}} {{instance}}", "up"),
            ("gateway view: {{replica}}", "tandem_stage_up"),
        ),
        "none",
        "stat",
    ),
)

# The pipeline's own.
PIPELINE = (
    Panel(
        "Time to first token",
        "Arrival to first generated token (tandem_time_to_first_token_seconds).",
        quantiles("tandem_time_to_first_token_seconds"),
        "s",
    ),
    Panel(
        "Inter-token latency",
        "Time between a sequence's generated tokens (tandem_inter_token_latency_seconds).",
        quantiles("tandem_inter_token_latency_seconds"),
        "s",
    ),
    Panel(
        "Tokens per second",
        "All sequences together, and one sequence's decode rate (1 / mean inter-token latency).",
        (
            ("all sequences", f"sum(rate(tandem_generation_tokens_total[{RATE}]))"),
            (
                "per sequence",
                f"sum(rate(tandem_inter_token_latency_seconds_count[{RATE}])) "
                f"/ sum(rate(tandem_inter_token_latency_seconds_sum[{RATE}]))",
            ),
        ),
        "short",
    ),
    Panel(
        "Running and waiting sequences",
        "Sequences in the running batch and queued for admission (tandem_sequences_running, _waiting).",
        (("running", "sum(tandem_sequences_running)"), ("waiting", "sum(tandem_sequences_waiting)")),
        "short",
    ),
    Panel(
        "Batch size per step",
        "Mean rows per scheduler step by phase (tandem_step_batch_size) and per stage batch "
        "(tandem_stage_batch_size).",
        (
            mean("tandem_step_batch_size", "phase", "gateway {{phase}}"),
            mean("tandem_stage_batch_size", "stage", "{{stage}}"),
        ),
        "short",
    ),
    Panel(
        "Stage call latency by stage and replica",
        "Gateway-side latency of one stage call, network included (tandem_stage_call_seconds).",
        quantiles("tandem_stage_call_seconds", "stage, replica", "{{stage}} {{replica}} "),
        "s",
    ),
    Panel(
        "Per-hop overhead by stage",
        "A stage call's time outside the stage's ONNX session: encoding, HTTP both ways, checks, "
        "decoding (tandem_stage_hop_overhead_seconds, from the stage's Server-Timing).",
        quantiles("tandem_stage_hop_overhead_seconds", "stage", "{{stage}} "),
        "s",
    ),
    Panel(
        "KV cache bytes",
        "Bytes of keys and values each stage replica holds (tandem_kv_cache_bytes).",
        (("{{stage}} {{instance}}", "sum by (stage, instance) (tandem_kv_cache_bytes)"),),
        "bytes",
    ),
    Panel(
        "KV cache sequences",
        "Sequences each stage replica holds a KV cache for (tandem_kv_cache_sequences).",
        (("{{stage}} {{instance}}", "sum by (stage, instance) (tandem_kv_cache_sequences)"),),
        "short",
    ),
    Panel(
        "Replays, failovers and evictions",
        "Rows replayed to rebuild a stage's KV cache, rows moved to another replica, KV cache "
        "evictions and misses (409) per second.",
        (
            rate("tandem_replays_total", "stage", "replays {{stage}}"),
            rate("tandem_failovers_total", "stage", "failovers {{stage}}"),
            rate("tandem_kv_cache_evictions_total", "stage", "evictions {{stage}}"),
            rate("tandem_kv_cache_misses_total", "stage", "misses {{stage}}"),
        ),
        "short",
    ),
    Panel(
        "Tokenizer latency",
        "Tokenizer operation latency by operation, p95 (tandem_tokenizer_seconds).",
        (
            (
                "{{op}} p95",
                f"histogram_quantile(0.95, sum by (le, op) (rate(tandem_tokenizer_seconds_bucket[{RATE}])))",
            ),
        ),
        "s",
    ),
    Panel(
        "Alert figures",
        "What the alert rules watch (observability/prometheus/rules): 5xx and 429 shares of requests, "
        "time to first token p95.",
        (
            ("5xx share", "tandem:request_errors:ratio_rate5m"),
            ("429 share", "tandem:requests_rejected:ratio_rate5m"),
            ("time to first token p95 (s)", "tandem:time_to_first_token_seconds:p95_5m"),
        ),
        "short",
    ),
)

ROWS = (("Overview", OVERVIEW), ("Pipeline", PIPELINE))


def panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        options["tooltip"] = {"mode": "multi", "sort": "desc"}
    else:  # stat: one tile per series, green UP / red DOWN
        options = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "textMode": "auto"}
        defaults["mappings"] = [
            {"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP"}}}
        ]
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        }
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": PROMETHEUS,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": PROMETHEUS, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(panel.targets)
        ],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        for i, panel in enumerate(row):
            panels.append(panel_json(panel, len(panels) + 1, (i % 2) * WIDTH, y + (i // 2) * HEIGHT))
        y += (len(row) + 1) // 2 * HEIGHT
    return {
        "uid": "tandem",
        "title": "tandem",
        "description": "GPT-2 split into ONNX pipeline stages: gateway, tokenizer and stage functions.",
        "tags": ["tandem"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "15s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [
            {
                "title": "Traces (Jaeger data source in Explore)",
                "type": "link",
                "icon": "external link",
                "url": f'/explore?left={{"datasource":"{JAEGER_UID}"}}',
                "targetBlank": True,
            }
        ],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
