"""The stack variant: the local stack started as a subprocess (or one given by URL), driven over
its OpenAI-compatible streaming completions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.benchmarks.common import (
    REPO_ROOT,
    STACK_READY_TIMEOUT_S,
    STACK_STOP_TIMEOUT_S,
    BenchError,
    Runner,
    log,
    timing,
)

# --------------------------------------------------------------------------------------------
# stack: the gateway over HTTP (OpenAI-compatible streaming completions)


def _stack_unreachable(url: str, err: Exception) -> BenchError:
    return BenchError(
        f"the tandem gateway at {url} is not reachable ({type(err).__name__}: {err}). Start the stack "
        "with `python -m infra.local.stack up --bundle DIR`, or leave out --stack-url so that the benchmark "
        "starts it, or leave the stack out with --variants monolith,hf."
    )


def stack_model_id(url: str) -> str:
    import httpx

    try:
        r = httpx.get(f"{url}/v1/models", timeout=10.0)
    except httpx.TransportError as e:
        raise _stack_unreachable(url, e) from e
    if r.status_code != 200:
        raise BenchError(f"GET {url}/v1/models answered {r.status_code}: {r.text[:300]}")
    try:
        data = r.json()["data"]
        return str(data[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"GET {url}/v1/models: no model in the answer {r.text[:300]!r}") from e


def _chunk_tokens(choice: dict) -> int:
    """How many tokens one streamed choice carries: token id lists if the gateway sends them,
    else one per chunk with non-empty text."""
    for key in ("token_ids", "tokens"):
        v = choice.get(key)
        if isinstance(v, list) and v:
            return len(v)
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("tokens"), list) and lp["tokens"]:
        return len(lp["tokens"])
    return 1 if choice.get("text") else 0


async def _one_stream(client, url: str, model: str, prompt: list[int], new_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        # usage (so far) in every chunk: tokens are counted from it, never from text (a bundle
        # exported without a tokenizer streams tokens whose text is empty)
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    tally = _Tally()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            detail = (await r.aread()).decode(errors="replace")[:500]
            raise BenchError(f"POST {url}/v1/completions answered {r.status_code}: {detail}")
        async for obj in _events(r):
            tally.add(obj, time.perf_counter())
    if not tally.times:
        raise BenchError("the gateway streamed no token")
    return {
        "first": tally.times[0],
        "last": tally.times[-1],
        "end": time.perf_counter(),
        "tokens": tally.usage_tokens if tally.usage_tokens is not None else tally.counted,
        "seen": tally.counted,
        "gaps": np.diff(tally.times).tolist(),
        "tokens_source": "usage" if tally.usage_tokens is not None else "chunks",
        "finish_reason": tally.finish,
        "text": "".join(tally.text),
    }


async def _events(r) -> AsyncIterator[dict]:
    """The JSON events of an SSE stream up to `data: [DONE]` (a stream that ends without it, an
    event that is not JSON or one that carries an error is a BenchError)."""
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise BenchError(f"the gateway sent an SSE event that is not JSON: {data[:200]!r}") from e
        if "error" in obj:
            raise BenchError(f"the gateway streamed an error: {json.dumps(obj['error'])[:500]}")
        yield obj
    raise BenchError("the gateway closed the stream without `data: [DONE]`")


@dataclass
class _Tally:
    """What one stream carried so far: when each token-carrying chunk arrived, the tokens counted
    (from the usage so far when the gateway sends it, else from the chunks), text, finish reason."""

    times: list[float] = field(default_factory=list)
    counted: int = 0
    usage_tokens: int | None = None
    finish: str | None = None
    text: list[str] = field(default_factory=list)

    def add(self, obj: dict, now: float) -> None:
        usage = obj.get("usage")
        so_far = usage.get("completion_tokens") if isinstance(usage, dict) else None
        for ch in obj.get("choices") or []:
            n = _chunk_tokens(ch) if so_far is None else int(so_far) - self.counted
            if n > 0:
                self.counted += n
                self.times.append(now)
            if ch.get("text"):
                self.text.append(ch["text"])
            if ch.get("finish_reason"):
                self.finish = ch["finish_reason"]
        if so_far is not None:
            self.usage_tokens = int(so_far)


HOP_METRIC = "tandem_stage_hop_overhead_seconds"


def hop_histogram(url: str) -> dict[float, float]:
    """The gateway's hop-overhead histogram, all stages together: {upper bound: cumulative count},
    with "sum" under -1.0."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    for fam in text_string_to_metric_families(text):
        if fam.name != HOP_METRIC:
            continue
        for smp in fam.samples:
            if smp.name.endswith("_bucket"):
                le = float(smp.labels["le"])
                out[le] = out.get(le, 0.0) + smp.value
            elif smp.name.endswith("_sum"):
                out[-1.0] = out.get(-1.0, 0.0) + smp.value
    return out


def hop_overhead(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50 (linear within its bucket, as Prometheus' histogram_quantile) and mean of the calls
    between two scrapes, in milliseconds."""
    bounds = sorted(b for b in after if b >= 0)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    n = cum[-1] if cum else 0.0
    if n <= 0:
        return {}
    rank, lo, below = n / 2, 0.0, 0.0
    p50 = float("nan")
    for b, k in zip(bounds, cum, strict=True):
        if k >= rank:
            p50 = b if b == float("inf") else lo + (b - lo) * (rank - below) / max(k - below, 1e-12)
            break
        lo, below = b, k
    mean = (after.get(-1.0, 0.0) - before.get(-1.0, 0.0)) / n
    return {"hop_overhead_p50_ms": 1000.0 * p50, "hop_overhead_mean_ms": 1000.0 * mean, "hop_calls": n}


async def _stack_run(url: str, model: str, prompts: np.ndarray, new_tokens: int) -> dict:
    import httpx

    c = prompts.shape[0]
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        try:
            streams = await asyncio.gather(
                *(_one_stream(client, url, model, prompts[i].tolist(), new_tokens) for i in range(c))
            )
        except httpx.ConnectError as e:
            raise _stack_unreachable(url, e) from e
        except httpx.TransportError as e:
            raise BenchError(
                f"the connection to the gateway at {url} failed during the run "
                f"({type(e).__name__}: {e!r}) with {c} concurrent streams"
            ) from e
        t_end = max(s["end"] for s in streams)
    short = [s["tokens"] for s in streams if s["tokens"] != new_tokens]
    if short:
        log(
            f"[stack] WARNING: {len(short)} of {c} streams returned {sorted(set(short))} tokens, "
            f"not {new_tokens} (is ignore_eos honoured?)"
        )
    r = timing(
        t0,
        [s["first"] for s in streams],
        [s["last"] for s in streams],
        t_end,
        [s["tokens"] for s in streams],
        [s["seen"] for s in streams],
        gaps=[g for s in streams for g in s["gaps"]],
    )
    # Chunk times tell the decode rate only if each chunk carries one token; usage counts the tokens.
    r["tokens_source"] = streams[0]["tokens_source"]
    r["texts"] = [s["text"] for s in streams]
    return r


class StackProcess:
    """`python -m infra.local.stack up --bundle DIR --no-export --no-prometheus --no-frontend` as a
    child process: the serving processes only, as in the measurements before those existed."""

    def __init__(
        self, bundle: Path, port: int, command: list[str] | None = None, env: dict[str, str] | None = None
    ):
        self.env = env  # extra environment for the launcher (and so its services)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = command or self.default_command(bundle, port)
        self.proc: subprocess.Popen | None = None
        self.log_file = None
        self.record: dict | None = None  # its entry in the benchmark's list of stacks

    @staticmethod
    def default_command(bundle: Path, port: int) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "infra.local.stack",
            "up",
            "--bundle",
            str(bundle.resolve()),
            "--no-export",
            "--no-prometheus",
            "--no-frontend",
        ]
        if port != 8000:
            args += ["--gateway-port", str(port)]
        return args

    def tail(self, lines: int = 40) -> str:
        if self.log_file is None:
            return ""
        self.log_file.flush()
        text = Path(self.log_file.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> str:
        import httpx

        try:  # something already on the gateway's port would answer instead of our stack
            httpx.get(f"{self.url}/readyz", timeout=1.0)
            raise BenchError(
                f"something already listens on {self.url}; stop it, or pass "
                f"--stack-url {self.url} to benchmark the stack that runs there"
            )
        except httpx.TransportError:
            pass
        args = self.command
        self.log_file = tempfile.NamedTemporaryFile(prefix="tandem-bench-stack-", suffix=".log", delete=False)
        log(f"[stack] starting: {' '.join(args[1:])} (output in {self.log_file.name})")
        self.proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(self.env or {})},
        )
        deadline = time.monotonic() + STACK_READY_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the stack exited with {self.proc.returncode} before it was ready; "
                    f"output tail:\n{self.tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if r.status_code == 200:
                    log(f"[stack] ready at {self.url}")
                    return self.url
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as e:
                last = repr(e)
            time.sleep(0.5)
        raise BenchError(
            f"the stack was not ready at {self.url}/readyz after {STACK_READY_TIMEOUT_S:.0f} s "
            f"(last: {last}); output tail:\n{self.tail()}"
        )

    def memory(self) -> dict[str, int]:
        """Resident bytes of each stage process the launcher started (from its pids.json)."""
        state = Path((self.env or {}).get("TANDEM_STATE_DIR", "")) / "pids.json"
        out: dict[str, int] = {}
        if not state.is_file():
            return out
        for service in json.loads(state.read_text())["services"]:
            if not service["name"].startswith("stage"):
                continue
            try:
                status = Path(f"/proc/{service['pid']}/status").read_text()
            except OSError:
                continue
            kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            out[service["name"]] = kb * 1024
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            log("[stack] stopping (SIGTERM)")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STACK_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(
                    f"[stack] still running {STACK_STOP_TIMEOUT_S:.0f} s after SIGTERM: killing its process group"
                )
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what we started
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if self.log_file is not None:
            self.log_file.close()
            if self.proc.returncode not in (0, -signal.SIGTERM):
                log(f"[stack] exited with {self.proc.returncode}; log kept at {self.log_file.name}")
            else:
                os.unlink(self.log_file.name)


@dataclass(frozen=True)
class StackSpec:
    """One configuration of the stack to measure, from a `--stacks` entry: `:`-separated tokens,
    `dN` (the gateway's pipeline_depth), `Xms` (a simulated delay added to every stage call, as if
    the stages were on other machines), `int8` (the int8-quantised bundle) and `sN` (the same model
    split into N stages: the bundle BUNDLE-sN). `base` alone is the gateway's own defaults (with
    --pipeline-depth / --hop-delay-ms applied)."""

    depth: int | None = None
    delay_ms: float = 0.0
    int8: bool = False
    stages: int | None = None

    @property
    def name(self) -> str:
        parts = [f"s{self.stages}"] if self.stages is not None else []
        parts += (["int8"] if self.int8 else []) + ([f"d{self.depth}"] if self.depth is not None else [])
        parts += [f"{self.delay_ms:g}ms"] if self.delay_ms else []
        return ":".join(["stack", *parts])

    @classmethod
    def parse(cls, text: str, depth: int | None, delay_ms: float) -> StackSpec:
        int8, stages = False, None
        for tok in (t.strip().lower() for t in text.split(":") if t.strip()):
            if tok == "base":
                continue
            if tok == "int8":
                int8 = True
            elif re.fullmatch(r"s[1-9]\d*", tok):
                stages = int(tok[1:])
            elif re.fullmatch(r"d[1-9]\d*", tok):
                depth = int(tok[1:])
            elif re.fullmatch(r"\d+(\.\d+)?ms", tok):
                delay_ms = float(tok[:-2])
            else:
                raise ValueError(
                    f"unknown stack token {tok!r} in {text!r}: use base, int8, dN (pipeline depth), "
                    "Xms (hop delay) or sN (the bundle split in N stages), joined with ':' (for example d3:5ms)"
                )
        return cls(depth, delay_ms, int8, stages)

    def without_delay(self) -> StackSpec:
        return StackSpec(self.depth, 0.0, self.int8, self.stages)


def split_bundle(bundle: Path, stages: int) -> Path:
    """BUNDLE-sN: the model of `bundle` split into `stages` stages, checked to hold the same weights."""
    other = bundle.with_name(f"{bundle.name}-s{stages}")
    how = f"`python -m export <the same --model or --random-init and --seed> --stages {stages} --out {other}`"
    if not (other / "manifest.json").is_file():
        raise BenchError(f"no {stages}-stage bundle at {other}; export one with {how}")
    mine, theirs = (json.loads((b / "manifest.json").read_text()) for b in (bundle, other))
    if (mine["model"]["id"], mine["model"]["revision"]) != (
        theirs["model"]["id"],
        theirs["model"]["revision"],
    ):
        raise BenchError(f"{other} holds another model than {bundle}; re-export it with {how}")
    if len(theirs["stages"]) != stages:
        raise BenchError(f"{other} has {len(theirs['stages'])} stages, not {stages}; re-export it with {how}")
    return other


def open_stack(args, spec: StackSpec, index: int, prompts: np.ndarray, bundle: Path, stack: list) -> Runner:
    """The gateway to measure; a stack the benchmark starts itself goes into `stack` (to stop).
    The index-th started stack takes its own ports and state directory, so several configurations
    stay loaded side by side (each idles while another runs)."""
    if spec.stages is not None:
        bundle = split_bundle(bundle, spec.stages)
    if spec.int8:
        bundle = Path(args.int8_bundle) if args.int8_bundle else bundle.with_name(bundle.name + "-int8")
        if not (bundle / "manifest.json").is_file():
            raise BenchError(
                f"no int8 bundle at {bundle}; export one with `python -m export ... --quantize int8 "
                f"--out {bundle}` (the same model as --bundle) or pass --int8-bundle DIR"
            )
    if args.stack_url:
        url = args.stack_url.rstrip("/")
    else:
        env = {
            "TANDEM_SIMULATED_HOP_DELAY": str(spec.delay_ms / 1000),
            "TANDEM_STATE_DIR": tempfile.mkdtemp(prefix="tandem-bench-state-"),
        }
        if spec.depth is not None:
            env["TANDEM_PIPELINE_DEPTH"] = str(spec.depth)
        port = args.stack_port + 10 * index  # the gateway; then the tokenizer, then the stages
        command = StackProcess.default_command(bundle, port) + [
            "--tokenizer-port",
            str(port + 1),
            "--stage-port-base",
            str(port + 2),
        ]
        launcher = StackProcess(bundle, port, command=command, env=env)
        stack.append(launcher)
        url = launcher.start()
    model = stack_model_id(url)
    record = {
        "variant": spec.name,
        "url": url,
        "model": model,
        "bundle": str(bundle),
        "started_by_bench": not args.stack_url,
        "pipeline_depth": spec.depth,
        "hop_delay_ms": spec.delay_ms,
    }
    args.stack_used.append(record)
    if not args.stack_url:
        stack[-1].record = record
    log(f"[{spec.name}] gateway {url}, model {model!r}")

    def run(c: int) -> dict:
        before = hop_histogram(url)
        r = asyncio.run(_stack_run(url, model, prompts[:c], args.new_tokens))
        return r | hop_overhead(before, hop_histogram(url))

    return run
