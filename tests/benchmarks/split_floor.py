"""What splitting a model into stage processes costs with no HTTP and no gateway: the floor under
the stack's N-stage figures.

    python -m tests.benchmarks.split_floor --bundles B1 B2 B3 B4 [--steps 150]
        [--prompt-tokens 32] [--loop-cpu auto|none|N] [--out FILE.json]

The bundles are the same model exported in different stage counts (the first is the reference,
normally 1 stage). For each, one sequence: a prefill of --prompt-tokens, then --steps decode steps
of one position through every stage in turn, measured two ways:

- in one process: the stages' engines (functions.engine.StageEngine) called one after another, the
  hidden states handed over in memory. What the split costs inside ONNX Runtime and the engine: a
  session run, the per-stage rotary tables and masks, the KV bookkeeping, once per stage.
- one process per stage: each engine in a process of its own, driven over a loopback TCP socket
  that carries 8 bytes each way (the step's number; the session's nanoseconds). Every stage builds
  its own inputs, so nothing is parsed or encoded. The serving thread is pinned as the local stack
  pins it (--loop-cpu auto). What the split costs once the stages are separate processes sharing
  the machine's cores: the hand-over between processes, each process's code fetched again after the
  others ran, the thread pools woken per process.

Reported per bundle: the median time per token and the median of the stages' session sum, and the
per-token rate against the first bundle's, for each way. The stack's own figures come from
`python -m tests.benchmarks.bench --stacks s1,s2,s3,s4`; the difference is what the real hop (HTTP,
the protocol, checks, metrics, the gateway between stages) adds on top of this floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from functions.bundle import load_manifest
from functions.engine import StageEngine
from infra.local.options import resolve_loop_cpu
from tests.benchmarks.hop_profile import describe, steps_of

WARMUP_STEPS = 10  # decode steps left out of the medians
CONNECT_TIMEOUT_S = 120.0  # a stage process loads its session before it listens


def _engine(bundle: Path, k: int, prompt: int, steps: int) -> tuple[StageEngine, list[dict[str, np.ndarray]]]:
    manifest = load_manifest(bundle)
    name, io, _ = describe(bundle, k)
    engine = StageEngine(bundle, manifest, manifest.stage(name))
    engine.warm_up()
    return engine, steps_of(io, prompt, steps)


def _summary(per_token: list[float], sessions: list[float]) -> dict[str, float]:
    return {
        "token_ms": float(np.median(per_token[WARMUP_STEPS:]) * 1e3),
        "sessions_ms": float(np.median(sessions[WARMUP_STEPS:]) * 1e3),
    }


def in_process(bundle: Path, n: int, prompt: int, steps: int) -> dict[str, float]:
    stages = [_engine(bundle, k, prompt, steps) for k in range(1, n + 1)]
    per_token, sessions = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        session = sum(engine.infer(inputs[i]).seconds for engine, inputs in stages)
        if i:  # step 0 is the prefill
            per_token.append(time.perf_counter() - t0)
            sessions.append(session)
    return _summary(per_token, sessions)


def _serve(bundle: Path, k: int, prompt: int, steps: int, port: int, loop_cpu: int | None) -> None:
    """A stage process: answers each step number with its session's nanoseconds."""
    from functions.process import pin_serving_thread

    engine, inputs = _engine(bundle, k, prompt, steps)
    if loop_cpu is not None:
        pin_serving_thread(loop_cpu)  # after the session: its pool threads keep every CPU
    with socket.create_server(("127.0.0.1", port)) as server:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(8):
                seconds = engine.infer(inputs[int.from_bytes(data, "little")]).seconds
                conn.sendall(int(seconds * 1e9).to_bytes(8, "little"))


def _connect(port: int, proc: Any) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        except OSError:
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the stage process for port {port} did not come up") from None
            time.sleep(0.2)


def _drive(conns: list[socket.socket], steps: int) -> dict[str, float]:
    per_token, sessions = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        session = 0
        for conn in conns:
            conn.sendall(i.to_bytes(8, "little"))
            session += int.from_bytes(conn.recv(8), "little")
        if i:  # step 0 is the prefill
            per_token.append(time.perf_counter() - t0)
            sessions.append(session / 1e9)
    return _summary(per_token, sessions)


def one_process_per_stage(
    bundle: Path, n: int, prompt: int, steps: int, loop_cpu: int | None
) -> dict[str, float]:
    from tests.helpers.procs import free_port

    ctx = mp.get_context("spawn")
    ports = [free_port() for _ in range(n)]
    procs = [
        ctx.Process(target=_serve, args=(bundle, k, prompt, steps, port, loop_cpu), daemon=True)
        for k, port in zip(range(1, n + 1), ports, strict=True)
    ]
    for proc in procs:
        proc.start()
    conns: list[socket.socket] = []
    try:
        conns = [_connect(port, proc) for port, proc in zip(ports, procs, strict=True)]
        return _drive(conns, steps)
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.split_floor", description=__doc__)
    p.add_argument(
        "--bundles",
        nargs="+",
        type=Path,
        required=True,
        help="bundles of one model; the first is the reference",
    )
    p.add_argument("--steps", type=int, default=150, help="decode steps (default 150)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument(
        "--loop-cpu", default="auto", help="pin each stage's serving thread as the local stack does"
    )
    p.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must be above {WARMUP_STEPS} (the warm-up steps left out)")
    loop_cpu = resolve_loop_cpu(args.loop_cpu)
    rows = []
    for bundle in args.bundles:
        stages = len(load_manifest(bundle).stages)
        row = {
            "bundle": bundle.name,
            "stages": stages,
            "in_process": in_process(bundle, stages, args.prompt_tokens, args.steps),
            "processes": one_process_per_stage(bundle, stages, args.prompt_tokens, args.steps, loop_cpu),
        }
        rows.append(row)
    print(
        "| stages | in one process: ms/token (sessions) | vs first | a process each: ms/token (sessions) | vs first |"
    )
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        for way in ("in_process", "processes"):
            row[way]["vs_first"] = rows[0][way]["token_ms"] / row[way]["token_ms"]
        a, b = row["in_process"], row["processes"]
        print(
            f"| {row['stages']} | {a['token_ms']:.2f} ({a['sessions_ms']:.2f}) | {a['vs_first']:.2f}x "
            f"| {b['token_ms']:.2f} ({b['sessions_ms']:.2f}) | {b['vs_first']:.2f}x |",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps({"steps": args.steps, "loop_cpu": loop_cpu, "bundles": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
