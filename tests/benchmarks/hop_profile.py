"""Where one stage call's time goes outside ONNX Runtime, one stage at a time.

    python -m tests.benchmarks.hop_profile [--bundle DIR] [--stages 1,2,3] [--steps 300]
        [--prompt-tokens 32] [--threads N] [--out FILE.json]

For each stage, alone on the machine, a single sequence: one prefill of --prompt-tokens, then
--steps decode steps of one position, as the gateway sends them.

- over HTTP: the stage process (`python -m functions.stage`), called with the gateway's own client
  (gateway.wire). Per call: the round trip, and the stage's time in its session (Server-Timing).
  Their difference is the hop overhead the gateway's tandem_stage_hop_overhead_seconds reports.
- the stage's own request histogram (tandem_http_request_duration_seconds) gives the mean time
  inside its handler; the round trip's mean minus that is the transport: uvicorn, the loopback
  socket and the client.
- in this process: the same steps on a StageEngine directly, no HTTP; its total minus its session
  time is the engine's own work (checks, KV bookkeeping, sampling).

Reported per stage (ms, over the decode steps after the first 10%): round trip, session and
overhead p50 / p90 / p99; then the overhead split into transport, handler (decode of the body,
encode of the answer, metrics) and engine, from means. The split is approximate: the engine's
part is measured in a second run of the same steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from functions import contract as c
from functions import protocol
from functions import stage_api as api
from functions.bundle import load_manifest
from functions.engine import StageEngine
from functions.stage_io import StageIO, stage_io
from gateway.clients import server_seconds
from gateway.wire import WireClient
from tests.helpers.procs import free_port, start_stage, stop_process

WARMUP_FRACTION = 0.1


def step_inputs(engine_io: StageIO, past: int, width: int, seq: int = 7) -> dict[str, np.ndarray]:
    """One row of `width` new positions after `past` held ones (zeros: the values do not matter)."""
    x = (
        np.zeros((1, width), dtype=np.int64)
        if engine_io.first
        else np.zeros((1, width, engine_io.hidden_size), dtype=np.float32)
    )
    inputs = {
        c.SEQUENCE_IDS: np.array([seq], dtype=np.int64),
        c.PAST_LENGTHS: np.array([past]),
        engine_io.x_name: x,
    }
    if past == 0:
        inputs[c.SEQUENCE_START] = np.array([True])
    return inputs


def describe(bundle: Path, k: int) -> tuple[str, StageIO, list[str]]:
    """The stage's name, what it takes and returns, and the output the gateway asks it for."""
    manifest = load_manifest(bundle)
    entry = manifest.stage(c.stage_name(k))
    io = stage_io(manifest, entry)
    return entry.name, io, [c.TOKEN_IDS] if io.last else [io.y_name]


def steps_of(io: StageIO, prompt: int, steps: int) -> list[dict[str, np.ndarray]]:
    """The prefill, then `steps` decode steps (starting over when the context window is full)."""
    room = io.max_positions - prompt
    out = [step_inputs(io, 0, prompt)]
    for i in range(steps):
        j = i % room
        out.append(step_inputs(io, prompt + j, 1) if j or i == 0 else step_inputs(io, 0, prompt))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values[int(len(values) * WARMUP_FRACTION) :]) * 1e3
    return {
        "p50": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


async def over_http(
    port: int, name: str, steps: list[dict[str, np.ndarray]], outputs: list[str]
) -> dict[str, Any]:
    client = WireClient(5.0)
    path = api.infer_path(name)
    rtt: list[float] = []
    session: list[float] = []
    before = (0.0, 0)
    try:
        for i, inputs in enumerate(steps):
            if i == 1:  # the handler's figures from here on: decode steps only
                before = await handler_totals(port, name)
            body, hlen = protocol.encode_request(inputs, outputs=outputs, binary_outputs=True)
            headers = {protocol.HEADER: str(hlen), "Content-Type": "application/octet-stream"}
            t0 = time.perf_counter()
            status, answer_headers, content = await client.post("127.0.0.1", port, path, body, headers)
            dt = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"{name} answered {status}: {content[:300]!r}")
            server = server_seconds(answer_headers.get("server-timing"))
            if server is None:
                raise RuntimeError(f"{name} sent no Server-Timing")
            if i and inputs[c.PAST_LENGTHS][0]:  # decode steps only
                rtt.append(dt)
                session.append(server)
        after = await handler_totals(port, name)
    finally:
        client.close()
    handler = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return {"rtt": rtt, "session": session, "handler": handler}


async def handler_totals(port: int, name: str) -> tuple[float, int]:
    """Seconds and count of the stage's infer requests so far, from its own /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    sums = {}
    for kind in ("sum", "count"):
        m = re.search(
            rf'^tandem_http_request_duration_seconds_{kind}{{[^}}]*route="/v2/models/{{model}}/infer"[^}}]*}} (\S+)$',
            text,
            re.M,
        )
        if m is None:
            raise RuntimeError(f"{name}'s /metrics has no infer request histogram")
        sums[kind] = float(m.group(1))
    return sums["sum"], int(sums["count"])


def in_process(
    bundle: Path, name: str, steps: list[dict[str, np.ndarray]], threads: int | None
) -> list[float]:
    """Engine time outside its session per decode step, no HTTP."""
    manifest = load_manifest(bundle)
    engine = StageEngine(bundle, manifest, manifest.stage(name), threads=threads)
    engine.warm_up()
    outside: list[float] = []
    for i, inputs in enumerate(steps):
        t0 = time.perf_counter()
        result = engine.infer(inputs)
        dt = time.perf_counter() - t0
        if i and inputs[c.PAST_LENGTHS][0]:
            outside.append(dt - result.seconds)
    return outside


def profile_stage(bundle: Path, k: int, steps: int, prompt: int, threads: int | None) -> dict[str, Any]:
    name, io, outputs = describe(bundle, k)
    plan = steps_of(io, prompt, steps)
    port = free_port()
    proc = start_stage(bundle, k, port, threads=threads)
    try:
        http = asyncio.run(over_http(port, name, plan, outputs))
    finally:
        stop_process(proc)
    engine_outside = in_process(bundle, name, plan, threads)
    rtt, session = np.asarray(http["rtt"]), np.asarray(http["session"])
    overhead = list(rtt - session)
    transport = max(float(rtt.mean()) - http["handler"], 0.0)  # outside the stage's handler
    engine_part = float(np.mean(engine_outside))
    return {
        "stage": name,
        "decode_steps": len(rtt),
        "rtt_ms": percentiles(list(rtt)),
        "session_ms": percentiles(list(session)),
        "overhead_ms": percentiles(overhead),
        "split_mean_ms": {
            "transport": transport * 1e3,
            "engine": engine_part * 1e3,
            "handler": max(float(np.mean(overhead)) - transport - engine_part, 0.0) * 1e3,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.hop_profile", description=__doc__)
    p.add_argument("--bundle", type=Path, default=Path("bundles/gpt2-random"))
    p.add_argument("--stages", default="1,2,3", help="comma-separated stage numbers (default 1,2,3)")
    p.add_argument("--steps", type=int, default=300, help="decode steps per stage (default 300)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: ORT's, as the stack)")
    p.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    results = []
    for k in (int(s) for s in args.stages.split(",")):
        r = profile_stage(args.bundle, k, args.steps, args.prompt_tokens, args.threads)
        results.append(r)
        o, s = r["overhead_ms"], r["split_mean_ms"]
        print(
            f"{r['stage']}: round trip p50 {r['rtt_ms']['p50']:.3f} ms, session p50 {r['session_ms']['p50']:.3f} ms, "
            f"overhead p50 / p90 / p99 {o['p50']:.3f} / {o['p90']:.3f} / {o['p99']:.3f} ms; mean split: "
            f"transport {s['transport']:.3f}, handler {s['handler']:.3f}, engine {s['engine']:.3f} ms",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "stages": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
