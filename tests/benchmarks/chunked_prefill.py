"""Chunked prefill, measured: a long prompt arrives while short streams are decoding.

    python -m tests.benchmarks.chunked_prefill [--bundle DIR] [--chunks 0,64,128,256]
        [--long 960] [--streams 4] [--repeats 3] [--burst 16x48]

The whole stack in this process (tests.helpers.inproc: the real tokenizer, stage and gateway apps,
no sockets); without --bundle a tiny random-weight GPT-2 is exported to a temporary directory.
Per prefill_chunk value and repeat: --streams greedy streams with 8-token prompts run; once each
has 5 tokens, a --long-token prompt arrives (4 new tokens). Reported, medians over the repeats:
  long ttft ms        the long prompt's arrival -> its first token
  itl p99 / max ms    the running streams' inter-token gaps from that arrival until the long
                      prompt's first token (the stall chunking removes), p99 and the largest
  alone ttft ms       the long prompt with nothing else running (what chunking costs it)
  burst ttft ms       --burst NxL: N prompts of L tokens at once, nothing running: mean and max
                      first-token time (what the shared budget costs short prompts)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.scheduler import Scheduler
from gateway.sequence import SamplingParams, Sequence
from tests.helpers.inproc import InProcessStack, in_process_stack


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def tiny_bundle(out: Path) -> Path:
    from export.random_init import make_random_model

    make_random_model("tiny", out / "hf", None, seed=0)
    cmd = [
        sys.executable,
        "-m",
        "export",
        "--model",
        str(out / "hf"),
        "--out",
        str(out / "b"),
        "--stages",
        "3",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "b"


async def drain(sched: Scheduler, seq: Sequence) -> None:
    async for _ in sched.stream(seq):
        pass


async def under_load(sched: Scheduler, long: list[int], streams: int) -> dict[str, float]:
    times: dict[int, list[float]] = {}
    accept = sched._accept

    def recording(s: Sequence, *args: Any, **kw: Any) -> None:
        accept(s, *args, **kw)
        times.setdefault(s.id, []).append(time.perf_counter())

    sched._accept = recording  # type: ignore[method-assign]
    try:
        running = sched.submit_all([[5 + i, 17, 42, 99, 7, 230, 11, 3] for i in range(streams)], greedy(400))
        tasks = [asyncio.create_task(drain(sched, s)) for s in running]
        while any(s.n_generated < 5 for s in running):
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        (seq,) = sched.submit_all([long], greedy(4))
        await drain(sched, seq)
        t1 = times[seq.id][0]
        for s, task in zip(running, tasks, strict=True):
            sched.cancel(s)  # a cancelled sequence gets no more events: stop reading it too
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while sched.running or sched.waiting:
            await asyncio.sleep(0.005)
    finally:
        del sched._accept  # type: ignore[attr-defined]
    gaps = []
    for s in running:
        ts = times[s.id]
        gaps += [b - a for a, b in zip(ts, ts[1:], strict=False) if b > t0 and a < t1]
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else float("nan")
    return {"long ttft ms": (t1 - t0) * 1e3, "itl p99 ms": p99 * 1e3, "itl max ms": max(gaps) * 1e3}


async def alone(sched: Scheduler, prompts: list[list[int]]) -> list[float]:
    t0 = time.perf_counter()
    seqs = sched.submit_all(prompts, greedy(1))
    await asyncio.gather(*(drain(sched, s) for s in seqs))
    return [((s.t_first or t0) - t0) * 1e3 for s in seqs]


def measure(stack: InProcessStack, chunk: int, args: argparse.Namespace) -> dict[str, float]:
    import dataclasses

    sched = stack.gateway.require_scheduler()
    sched.cfg = dataclasses.replace(sched.cfg, prefill_chunk=chunk)
    long = [(37 * i + 11) % 500 + 5 for i in range(args.long)]
    n, length = (int(v) for v in args.burst.split("x"))
    burst = [[(13 * i + 7 * j) % 500 + 5 for j in range(length)] for i in range(n)]
    runs: list[dict[str, float]] = []
    for _ in range(args.repeats):
        r = stack.run(under_load(sched, long, args.streams), timeout=300)
        r["alone ttft ms"] = stack.run(alone(sched, [long]), timeout=300)[0]
        b = stack.run(alone(sched, burst), timeout=300)
        r["burst ttft mean ms"], r["burst ttft max ms"] = statistics.mean(b), max(b)
        runs.append(r)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--chunks", default="0,64,128,256")
    ap.add_argument("--long", type=int, default=960)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--burst", default="16x48")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        with in_process_stack(bundle, config={"max_running": 64}) as stack:
            stack.run(under_load(stack.gateway.require_scheduler(), [5] * 64, 2), timeout=300)  # warm-up
            print(f"long prompt {args.long} tokens, {args.streams} running streams, burst {args.burst}")
            for chunk in (int(c) for c in args.chunks.split(",")):
                r = measure(stack, chunk, args)
                print(f"prefill_chunk {chunk:>4}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
