"""OpenTelemetry across the whole stack as real processes: one trace per request, W3C trace context
through every hop (gateway -> tokenizer, gateway -> each stage), `gen_ai.*` attributes on the
request's span, and the trace id handed back to the client. Spans go to an in-test OTLP/HTTP
receiver; tracing is configured only by the standard OTEL_* variables. (Over 300 lines: the tests
share one traced stack, which is slow to start, so they stay in one module.)
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.otlp import OtlpReceiver, SpanRecord
from tests.helpers.stack import Stack, start_stack

pytestmark = pytest.mark.slow

SERVICES = {"gateway", "tokenizer", "stage-1", "stage-2", "stage-3"}  # functions/telemetry.py's service.name
STAGES = ("stage-1", "stage-2", "stage-3")
PROMPTS = ["Hello the model", "quick brown fox jumps over the lazy dog today and", "café 東京 🙂"]
HEX32 = re.compile(r"[0-9a-f]{32}")
# Variables that would change where spans go or what the services call themselves.
OTEL_VARS = (
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_PROPAGATORS",
)


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced_stack(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver
) -> Iterator[Stack]:
    """A stack exporting to `otlp`. The tokenizer and stages inherit this process's environment
    (start_stack gives `gateway_env` to the gateway only), so the variables are set here for as
    long as the stack starts, and restored afterwards."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with pytest.MonkeyPatch.context() as mp:
        for name in OTEL_VARS:
            mp.delenv(name, raising=False)  # each service names itself
        for name, value in env.items():
            mp.setenv(name, value)
        stack = start_stack(tiny_bundle, tmp_path_factory.mktemp("traced"), gateway_env=env)
    try:
        yield stack
    finally:
        stack.stop()


def server_spans(spans: list[SpanRecord], service: str) -> list[SpanRecord]:
    return [s for s in spans if s.service == service and s.kind == "SERVER"]


def complete(spans: list[SpanRecord]) -> bool:
    """Every service has sent its spans of the request: the gateway's server span (ended last,
    after the response, so every call span was exported with or before it), the tokenizer's,
    and one infer server span per gateway call span in each stage. (Each process exports on
    its own schedule: any one span having arrived says nothing about the others.)"""
    gateway_done = any(s.parent_span_id is None for s in server_spans(spans, "gateway"))
    tokenizer_done = any(s.name == "tokenizer.encode" for s in spans if s.service == "tokenizer")
    return gateway_done and tokenizer_done and stages_complete(spans)


def stages_complete(spans: list[SpanRecord]) -> bool:
    """Each stage has sent one infer server span per batched step. A step shows up as one gateway
    call span per row (each in its own request's trace), so over the traces of every request
    involved, the steps of a stage number the sum of 1 / batch_size over its call spans."""
    for st in STAGES:
        calls = [s for s in spans if s.service == "gateway" and s.name == f"{st} call"]
        steps = round(sum(1 / c.attributes["tandem.batch_size"] for c in calls))
        if sum(1 for s in server_spans(spans, st) if s.name.endswith("/infer")) < steps:
            return False
    return True


def tree(spans: list[SpanRecord]) -> str:
    """An indented span tree (service: name [kind] attributes) for failure messages and reports."""
    by_parent: dict[str | None, list[SpanRecord]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_ns):
        by_parent.setdefault(s.parent_span_id if s.parent_span_id in ids else None, []).append(s)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in by_parent.get(parent, []):
            orphan = " (parent not received)" if depth == 0 and s.parent_span_id else ""
            attrs = {k: v for k, v in s.attributes.items() if k.startswith(("gen_ai.", "tandem."))}
            lines.append(f"{'  ' * depth}{s.service}: {s.name} [{s.kind}]{orphan} {attrs or ''}".rstrip())
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def request_trace(otlp: OtlpReceiver, trace_id: str, *, batched: bool = False) -> list[SpanRecord]:
    """A request's spans once every service has sent them; `batched` waits only for the gateway
    and the tokenizer (the stage spans of a batch sit in the trace of its first row)."""
    if batched:

        def done(spans: list[SpanRecord]) -> bool:
            roots = any(s.parent_span_id is None for s in server_spans(spans, "gateway"))
            return roots and any(s.name == "tokenizer.encode" for s in spans)

        spans = otlp.wait_for(done, trace_id=trace_id, timeout=10)
        assert done(spans), f"incomplete trace {trace_id} after 10 s:\n{tree(spans)}"
        return spans
    spans = otlp.wait_for(complete, trace_id=trace_id, timeout=10)
    assert complete(spans), f"incomplete trace {trace_id} after 10 s:\n{tree(spans)}\nerrors: {otlp.errors}"
    return spans


def check_request_trace(spans: list[SpanRecord], route: str, *, batched: bool = False) -> SpanRecord:
    """The structure every generation's trace has; returns the gateway's request span. With
    `batched`, the stage's server spans may sit in another request's trace (the batch's first row)."""
    by_id = {s.span_id: s for s in spans}
    services = {s.service for s in spans}
    if batched:  # a request never first in a stage's batch has no stage server span of its own
        assert {"gateway", "tokenizer"} <= services <= SERVICES, tree(spans)
    else:
        assert services == SERVICES, tree(spans)
    # one root: the gateway's server span for the request, carrying the gen_ai attributes
    roots = [s for s in spans if s.parent_span_id is None]
    assert len(roots) == 1, tree(spans)
    root = roots[0]
    assert (root.service, root.kind) == ("gateway", "SERVER"), tree(spans)
    assert root.name == f"POST {route}", tree(spans)
    assert root.attributes.get("gen_ai.request.model") == "gpt2"
    assert root.attributes.get("gen_ai.operation.name") == "text_completion"
    assert isinstance(root.attributes.get("gen_ai.request.max_tokens"), int)
    assert isinstance(root.attributes.get("gen_ai.request.temperature"), float)
    assert isinstance(root.attributes.get("gen_ai.usage.input_tokens"), int)
    assert root.attributes["gen_ai.usage.input_tokens"] > 0
    assert isinstance(root.attributes.get("gen_ai.usage.output_tokens"), int)
    reasons = root.attributes.get("gen_ai.response.finish_reasons")
    assert reasons and set(reasons) <= {"length", "stop"}, root.attributes
    # every other span hangs, directly or not, under that root: nothing orphaned
    for s in spans:
        assert s.parent_span_id is None or s.parent_span_id in by_id, (
            f"{s.service}: {s.name} orphaned\n{tree(spans)}"
        )

    # the tokenizer: gateway span -> tokenizer server span -> tokenizer.encode
    [tok_call] = [s for s in spans if s.service == "gateway" and s.name == "tokenizer encode"]
    assert tok_call.parent_span_id == root.span_id
    tok_server = [s for s in server_spans(spans, "tokenizer") if s.name == "POST /v1/encode"]
    assert [s.parent_span_id for s in tok_server] == [tok_call.span_id], tree(spans)
    [encode] = [s for s in spans if s.service == "tokenizer" and s.name == "tokenizer.encode"]
    assert encode.parent_span_id == tok_server[0].span_id
    assert encode.attributes.get("tandem.tokens") == root.attributes["gen_ai.usage.input_tokens"]

    # every stage: each gateway call span is the request's child and the parent of exactly one
    # infer server span in that stage (context crossed the aiohttp hop); each infer span has
    # the stage's own "<stage> infer" span below it
    for stage in STAGES:
        calls = [s for s in spans if s.service == "gateway" and s.name == f"{stage} call"]
        assert calls or batched, f"no '{stage} call' span\n{tree(spans)}"
        infers = [s for s in server_spans(spans, stage) if s.name == f"POST /v2/models/{stage}/infer"]
        if batched:  # only the calls made for a batch's first row have the stage's spans below
            assert len(infers) <= len(calls), tree(spans)
        else:
            assert len(infers) == len(calls), tree(spans)
        for call in calls:
            assert call.parent_span_id == root.span_id
            assert batched or call.attributes.get("tandem.batch_size") == 1
            children = [s for s in infers if s.parent_span_id == call.span_id]
            if batched and not children:
                continue  # a call for a row that was not first in its batch
            assert len(children) == 1, (
                f"{stage}: call {call.span_id} has {len(children)} infer spans\n{tree(spans)}"
            )
            inner = [
                s for s in spans if s.parent_span_id == children[0].span_id and s.name == f"{stage} infer"
            ]
            assert len(inner) == 1, tree(spans)
    return root


def test_process_request_is_one_trace_across_every_service(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    r = httpx.post(
        f"{traced_stack.gateway_url}/api/model/process",
        json={"text": "Hello the model", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    tid = body["trace_id"]
    assert isinstance(tid, str) and HEX32.fullmatch(tid), tid
    assert r.headers["X-Trace-Id"] == tid
    spans = request_trace(otlp, tid)
    root = check_request_trace(spans, "/api/model/process")
    assert root.attributes["gen_ai.usage.input_tokens"] == body["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == body["completion_tokens"] == 4
    assert root.attributes["gen_ai.request.max_tokens"] == 4
    assert root.attributes["gen_ai.request.temperature"] == 0.0  # the original contract's greedy default
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert (root.attributes["tandem.steps"], root.attributes["tandem.steps_traced"]) == (4, 4)
    # one prefill plus three decode steps (the 4th token comes from the 3rd decode's logits):
    # every stage is called once per step
    for stage in STAGES:
        calls = [s for s in spans if s.service == "gateway" and s.name == f"{stage} call"]
        assert len(calls) == 4, tree(spans)
    assert otlp.errors == []
    print(f"\ntrace {tid}:\n{tree(spans)}")  # shown with -s: the tree the report describes


def test_each_request_gets_its_own_trace(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    ids = []
    for _ in range(2):
        r = httpx.post(
            f"{traced_stack.gateway_url}/api/model/process",
            json={"text": "Hello the model", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["trace_id"])
    assert all(isinstance(t, str) and HEX32.fullmatch(t) for t in ids), ids
    assert ids[0] != ids[1]
    for tid in ids:
        spans = request_trace(otlp, tid)
        check_request_trace(spans, "/api/model/process")
    # no span of one request leaked into the other's trace
    first, second = ({s.span_id for s in otlp.spans(t)} for t in ids)
    assert not first & second


def test_completions_return_the_trace_id_header(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    r = httpx.post(
        f"{traced_stack.gateway_url}/v1/completions",
        json={
            "model": "gpt2",
            "prompt": "Hello the model",
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    tid = r.headers.get("X-Trace-Id")
    assert tid is not None and HEX32.fullmatch(tid), dict(r.headers)
    spans = request_trace(otlp, tid)
    root = check_request_trace(spans, "/v1/completions")
    assert root.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"] == 3


def test_streamed_completions_return_the_trace_id_header(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    with httpx.stream(
        "POST",
        f"{traced_stack.gateway_url}/v1/completions",
        json={"prompt": "Hello the model", "max_tokens": 3, "stream": True, "ignore_eos": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        tid = r.headers.get("X-Trace-Id")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert tid is not None and HEX32.fullmatch(tid), dict(r.headers)
    spans = request_trace(otlp, tid)
    root = check_request_trace(spans, "/v1/completions")
    assert root.attributes["gen_ai.usage.input_tokens"] == 3  # "Hello the model"
    assert root.attributes.get("gen_ai.usage.output_tokens") == 3, root.attributes  # set after the stream


def test_batched_requests_keep_their_own_traces(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    """Concurrent requests share stage calls, yet every request's own trace holds one call span per
    stage and generated token, parented by its request span; the stage's server span hangs under
    the call span of the batch's first row."""
    n_tokens = 6

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"{traced_stack.gateway_url}/api/model/process",
                        json={"text": text, "max_tokens": n_tokens, "ignore_eos": True},
                    )
                    for text in PROMPTS
                )
            )

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    ids = [r.json()["trace_id"] for r in responses]
    assert len(set(ids)) == len(PROMPTS)
    roots = {}
    for tid, r in zip(ids, responses, strict=True):
        spans = request_trace(otlp, tid, batched=True)
        roots[tid] = check_request_trace(spans, "/api/model/process", batched=True)
        assert roots[tid].attributes["gen_ai.usage.output_tokens"] == n_tokens
        assert roots[tid].attributes["gen_ai.usage.input_tokens"] == r.json()["prompt_tokens"]
    union = otlp.wait_for(
        lambda spans: stages_complete([s for s in spans if s.trace_id in roots]), timeout=10
    )
    union = [s for s in union if s.trace_id in roots]
    assert stages_complete(union), tree(union)
    calls = [s for s in union if s.service == "gateway" and s.name.endswith(" call")]
    batch_sizes = [c.attributes["tandem.batch_size"] for c in calls]
    assert max(batch_sizes) > 1, "the requests were never batched: nothing here tests batching"
    for tid, root in roots.items():
        for stage in STAGES:
            mine = [c for c in calls if c.name == f"{stage} call" and c.parent_span_id == root.span_id]
            assert len(mine) == n_tokens, f"{stage}: {len(mine)} calls for {tid}\n{tree(otlp.spans(tid))}"
    # one call span per row of every step
    assert len(calls) == len(PROMPTS) * n_tokens * len(STAGES)


@pytest.fixture(scope="module")
def untraced_stack(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with no OTEL_* variable at all: tracing must stay off."""
    with pytest.MonkeyPatch.context() as mp:
        for name in OTEL_VARS:
            mp.delenv(name, raising=False)
        stack = start_stack(tiny_bundle, tmp_path_factory.mktemp("untraced"))
    try:
        yield stack
    finally:
        stack.stop()


def test_without_tracing_every_response_still_carries_an_id(untraced_stack: Stack) -> None:
    """Tracing off: X-Trace-Id is a fresh random id on every response (no trace stored under it),
    and /api/model/process's trace_id is the same value."""
    ids = []
    for _ in range(2):
        r = httpx.post(
            f"{untraced_stack.gateway_url}/api/model/process",
            json={"text": "Hello the model", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["trace_id"] == r.headers["X-Trace-Id"]
        ids.append(r.headers["X-Trace-Id"])
    ids += every_route_ids(untraced_stack.gateway_url)
    assert all(HEX32.fullmatch(t) for t in ids), ids
    assert len(set(ids)) == len(ids), ids


def every_route_ids(gateway: str) -> list[str]:
    """X-Trace-Id of one response from every gateway route (and of a refused request on each
    generation route); fails if any response lacks it."""
    out = []
    with httpx.Client(base_url=gateway, timeout=60) as c:
        responses = [
            c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}),
            c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "stream": True}),
            c.post("/v1/completions", json={"prompt": "Hello", "temperature": -1}),
            c.post("/api/model/process", json={"text": ""}),
            c.get("/v1/models"),
            c.get("/readyz"),
            c.get("/healthz"),
            c.get("/metrics"),
            c.get("/docs"),
        ]
    for r in responses:
        assert r.headers.get_list("X-Trace-Id") and len(r.headers.get_list("X-Trace-Id")) == 1, (
            r.request.url,
            dict(r.headers),
        )
        out.append(r.headers["X-Trace-Id"])
    assert [r.status_code for r in responses] == [200, 200, 400, 400, 200, 200, 200, 200, 200]
    return out


def test_every_route_returns_its_trace_id(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    """Traced routes answer their own trace's id: the gateway's server span is found under it,
    for refused requests too. Untraced routes (health, metrics) answer a fresh id."""
    ids = every_route_ids(traced_stack.gateway_url)
    assert all(HEX32.fullmatch(t) for t in ids) and len(set(ids)) == len(ids), ids
    refused_completion, refused_process, models, docs = ids[2], ids[3], ids[4], ids[8]
    for tid, name in (
        (refused_completion, "POST /v1/completions"),
        (refused_process, "POST /api/model/process"),
        (models, "GET /v1/models"),
        (docs, "GET /docs"),
    ):
        spans = otlp.wait_for(lambda spans: any(s.parent_span_id is None for s in spans), trace_id=tid)
        roots = [s for s in spans if s.parent_span_id is None]
        assert [(s.service, s.name) for s in roots] == [("gateway", name)], tree(spans)
    for tid in ids[5:8]:  # /readyz, /healthz, /metrics: no trace was recorded under these
        assert otlp.spans(tid) == []


def test_a_long_generation_traces_a_sample_of_its_steps(traced_stack: Stack, otlp: OtlpReceiver) -> None:
    """40 tokens: the first TRACED_STEPS steps and every TRACE_EVERY-th after get stage-call spans
    (0..15 and 32: 17 per stage); the others are summed on the request span, and the stages record
    nothing for them (no trace of their own)."""
    from gateway.tracing import TRACE_EVERY, TRACED_STEPS

    n = 40
    traced = [k for k in range(n) if k < TRACED_STEPS or k % TRACE_EVERY == 0]
    assert len(traced) < n  # the test is about the sampled part
    r = httpx.post(
        f"{traced_stack.gateway_url}/api/model/process",
        json={"text": "Hello the model", "max_tokens": n, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    spans = request_trace(otlp, body["trace_id"])
    root = check_request_trace(spans, "/api/model/process")
    assert root.attributes["tandem.steps"] == n
    assert root.attributes["tandem.steps_traced"] == len(traced)
    for stage in STAGES:
        calls = [s for s in spans if s.service == "gateway" and s.name == f"{stage} call"]
        assert len(calls) == len(traced), tree(spans)
        summed = root.attributes[f"tandem.stage_seconds.{stage}"]
        assert abs(summed - body["metrics"]["stage_ms"][stage] / 1000) < 1e-3
    orphans = [  # an infer call that opened a trace of its own (start-up metadata calls do, rightly)
        s for s in otlp.spans() if s.service in STAGES and s.parent_span_id is None and "infer" in s.name
    ]
    assert orphans == [], orphans


def test_the_ui_is_told_whether_the_gateway_traces(traced_stack: Stack, untraced_stack: Stack) -> None:
    """GET /api/nodes says whether the gateway exports traces: the UI links a trace only then."""
    for stack, tracing in ((traced_stack, True), (untraced_stack, False)):
        r = httpx.get(f"{stack.gateway_url}/api/nodes", timeout=10)
        assert r.status_code == 200 and r.json()["tracing"] is tracing, r.text
