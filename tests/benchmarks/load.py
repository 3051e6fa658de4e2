"""Load test: many clients against the stack for a while, every answer checked, memory watched.

    python -m tests.benchmarks.load [--bundle DIR] [--clients 64] [--seconds 60] [--max-tokens 48]
        [--stack-url URL] [--out FILE.json]

Each client sends requests back to back until the time is up: a random prompt (3-120 words), a
random `max_tokens` (1..--max-tokens), greedy or sampled, streamed or not, through
`/v1/completions` (and one in eight through `/api/model/process`). Every answer is checked: a 200
must be complete and well formed (non-streamed: text, finish_reason, usage adding up, no more
tokens than asked; streamed: parseable chunks ending in `[DONE]`, usage in the last one); a 429
must carry Retry-After (the load is bounded by the gateway's queue). Anything else is an error.

Memory: the resident set (VmRSS) of every process of the stack is read before the load (after one
warm-up request), every second during it, and again after the load has ended and the stages have
freed the finished sequences; the report gives baseline, peak and after per process, and whether
"after" is back near the baseline (within 25 % or 64 MB). Without --stack-url the command starts
`python -m infra.local.stack up` itself (serving processes only) and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.benchmarks.common import DEFAULT_BUNDLE, REPO_ROOT, BenchError, log
from tests.benchmarks.stack_client import StackProcess

WORDS = "the of and model token stage pipeline cache gateway replica stream batch quick brown fox".split()
NEAR = (1.25, 64 << 20)  # "back near the baseline": within 25 % or 64 MB of it


@dataclass
class Tally:
    ok: int = 0
    refused_429: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.load", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default=DEFAULT_BUNDLE)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--stack-url", help="a running stack's gateway (its processes' memory is not read)")
    p.add_argument(
        "--port",
        type=int,
        default=8090,
        help="gateway port of the stack this command starts (the tokenizer and stages take the next ones)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON here")
    return p.parse_args(argv)


def request_body(rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any], bool]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
    n = rng.randint(1, max_tokens)
    sampled = rng.random() < 0.5
    if rng.random() < 0.125:
        return "/api/model/process", {"text": prompt, "max_tokens": n}, False
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": n, "temperature": 0.8 if sampled else 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return "/v1/completions", body, stream


def check_answer(
    path: str, body: dict[str, Any], status: int, text: str, headers: httpx.Headers
) -> str | int:
    """Generated tokens for a good answer, "429" for a bounded refusal, else what is wrong."""
    if status == 429:
        return "429" if headers.get("retry-after") else "429 without Retry-After"
    if status != 200:
        return f"{status}: {text[:200]}"
    n = body["max_tokens"]
    if path == "/api/model/process":
        d = json.loads(text)
        ok = isinstance(d.get("text"), str) and len(d["token_ids"]) == d["completion_tokens"] <= n
        return d["completion_tokens"] if ok else f"malformed process answer: {text[:200]}"
    if not body.get("stream"):
        d = json.loads(text)
        u, ch = d["usage"], d["choices"][0]
        ok = isinstance(ch["text"], str) and ch["finish_reason"] in ("length", "stop")
        ok = (
            ok
            and u["completion_tokens"] <= n
            and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        )
        return u["completion_tokens"] if ok else f"malformed completion: {text[:200]}"
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    if not lines or lines[-1] != "[DONE]":
        return f"stream did not end with [DONE]: {text[-200:]}"
    chunks = [json.loads(x) for x in lines[:-1]]
    if any("error" in c for c in chunks):
        return f"error event in the stream: {text[-300:]}"
    usage = chunks[-1].get("usage")
    if not usage or usage["completion_tokens"] > n:
        return f"stream without a valid usage chunk: {lines[-2][:200]}"
    return int(usage["completion_tokens"])


async def client(url: str, deadline: float, rng: random.Random, max_tokens: int, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < deadline:
            path, body, _ = request_body(rng, max_tokens)
            try:
                r = await c.post(path, json=body)
                verdict = check_answer(path, body, r.status_code, r.text, r.headers)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                verdict = f"{type(e).__name__}: {e}"
            if isinstance(verdict, int):
                tally.ok += 1
                tally.tokens += verdict
            elif verdict == "429":
                tally.refused_429 += 1
                await asyncio.sleep(float(r.headers["retry-after"]))
            else:
                tally.errors.append(verdict)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(pids: dict[str, int]) -> dict[str, int]:
    return {name: rss_bytes(pid) for name, pid in pids.items()}


async def load(url: str, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    peak = memory(pids)

    async def watch() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            for name, b in memory(pids).items():
                peak[name] = max(peak[name], b)

    t0 = time.monotonic()
    rngs = [random.Random(args.seed * 1000 + i) for i in range(args.clients)]
    await asyncio.gather(watch(), *(client(url, deadline, r, args.max_tokens, tally) for r in rngs))
    wall = time.monotonic() - t0
    return {
        "wall_s": wall,
        "ok": tally.ok,
        "refused_429": tally.refused_429,
        "errors": tally.errors,
        "generated_tokens": tally.tokens,
        "tok_s": tally.tokens / wall,
        "peak": peak,
    }


def settle(url: str, pids: dict[str, int], timeout: float = 30.0) -> dict[str, int]:
    """Memory once the stages hold no sequence any more (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = httpx.get(f"{url}/api/nodes", timeout=5).json()
        held = sum((r.get("kv") or {}).get("sequences", 0) for s in nodes["stages"] for r in s["replicas"])
        if held == 0:
            break
        time.sleep(0.5)
    time.sleep(2.0)
    return memory(pids)


def report(args: argparse.Namespace, out: dict[str, Any]) -> str:
    lines = [
        f"{args.clients} clients x {args.seconds:.0f} s on {out['url']}: {out['ok']} answers checked and "
        f"well formed, {out['refused_429']} refused with 429, {len(out['errors'])} errors; "
        f"{out['generated_tokens']} tokens generated ({out['tok_s']:.1f} tok/s)",
        "",
        "| process | RSS before MB | peak MB | after MB | back near baseline |",
        "|---|---:|---:|---:|---|",
    ]
    for name, before in out["baseline"].items():
        after, peak = out["after"][name], out["peak"][name]
        near = after <= max(before * NEAR[0], before + NEAR[1])
        lines.append(
            f"| {name} | {before / 2**20:.0f} | {peak / 2**20:.0f} | {after / 2**20:.0f} | {'yes' if near else 'NO'} |"
        )
    lines += [f"error: {e}" for e in out["errors"][:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack: StackProcess | None = None
    state = Path(tempfile.mkdtemp(prefix="tandem-load-"))
    try:
        if args.stack_url:
            url, pids = args.stack_url.rstrip("/"), {}
        else:
            bundle = (REPO_ROOT / args.bundle) if not Path(args.bundle).is_absolute() else Path(args.bundle)
            if not (bundle / "manifest.json").is_file():
                raise BenchError(f"no bundle at {bundle}; export one first (see docs/benchmarks.md)")
            # the tokenizer and the stages on the ports after the gateway's, not on 8100-8103
            ports = ["--tokenizer-port", str(args.port + 1), "--stage-port-base", str(args.port + 2)]
            command = StackProcess.default_command(bundle, args.port) + ports
            stack = StackProcess(bundle, args.port, command=command, env={"TANDEM_STATE_DIR": str(state)})
            url = stack.start()
            services = json.loads((state / "pids.json").read_text())["services"]
            pids = {s["name"]: s["pid"] for s in services}
        warm = httpx.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120)
        if warm.status_code != 200:
            raise BenchError(f"the warm-up request failed: {warm.status_code} {warm.text[:300]}")
        baseline = memory(pids)
        log(f"[load] {args.clients} clients for {args.seconds:.0f} s against {url}")
        out = asyncio.run(load(url, args, pids))
        out |= {"url": url, "baseline": baseline, "after": settle(url, pids) if pids else {}}
        print(report(args, out))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2))
        near = all(out["after"][n] <= max(b * NEAR[0], b + NEAR[1]) for n, b in baseline.items())
        return 0 if not out["errors"] and out["ok"] > 0 and near else 1
    except BenchError as e:
        print(f"load: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
