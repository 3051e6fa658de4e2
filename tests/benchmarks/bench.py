"""Benchmark: the tandem stack against the same model run monolithically, in one run.

    python -m tests.benchmarks.bench [--bundle DIR] [--prompt-tokens 32] [--new-tokens 64]
        [--concurrency 1,16] [--repeats 3] [--variants monolith,hf,stack] [--stack-url URL]
        [--skip-hf] [--out FILE.json]

Variants, run one after the other (never at the same time: they share the CPU):
  monolith  DIR/reference/model.onnx (the whole model exported by optimum, with KV cache) run by
            ONNX Runtime in this process, greedy loop in numpy, KV cache fed back each step.
            This is the baseline.
  hf        transformers PyTorch `GPT2LMHeadModel.generate`, greedy, on the same weights (the
            seeded random model is rebuilt the way the export built it).
  stack     the tandem stack over HTTP: the gateway's OpenAI-compatible streaming
            `POST /v1/completions`. Without --stack-url the benchmark starts
            `python -m infra.local.stack up --bundle DIR --no-export` itself and stops it at the end.

For each concurrency level C: C sequences with a PROMPT_TOKENS-token prompt each (seeded random
token ids, the same ids for every variant), NEW_TOKENS new tokens greedy, no early stop. The
in-process variants run the C sequences as one batch; the stack gets C concurrent HTTP streams.
All variants are loaded side by side (the stack's processes idle while the monolith runs and the
other way round) and take turns run by run: per concurrency level one warm-up run each, then
--rounds x --repeats measured passes in which every variant runs once, in an order that rotates
from pass to pass. The machine's speed drifts over seconds on a shared host (the monolith alone
moved between 58 and 83 tok/s over one day), so a variant's figures are medians over its runs, and
"vs monolith" is the median over passes of (variant / monolith in the same pass): a paired ratio
that the drift mostly cancels out of.
  first token ms         start of the generation -> first new token (mean over the C sequences)
  decode tok/s/stream    (NEW_TOKENS - 1) / (last token - first token), mean over the sequences
  aggregate tok/s        C * NEW_TOKENS / wall time of the whole generation
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = "bundles/gpt2-random"
EXPORT_HINT = "python -m export --random-init gpt2 --with-reference --out {out}"
VARIANTS = ("monolith", "hf", "stack")
STACK_READY_TIMEOUT_S = 180.0
STACK_STOP_TIMEOUT_S = 30.0
TARGET_STACK_VS_MONOLITH_C1 = 0.8
TARGET_STACK_SCALING = 3.0
# pause before every run, so that the previous variant's threads (torch's OpenMP pool, ORT's) are
# asleep and each run starts from a quiet machine
SETTLE_S = 0.3


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# inputs and bookkeeping


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench",
        description="Measure the tandem stack against the monolithic ONNX model and HF transformers.",
    )
    p.add_argument(
        "--bundle",
        default=DEFAULT_BUNDLE,
        help=f"model bundle made with --with-reference (default {DEFAULT_BUNDLE})",
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,16", help="comma-separated sequence counts (default 1,16)")
    p.add_argument(
        "--repeats", type=int, default=1, help="passes per round (default 1); also stage start-ups timed"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of monolith,hf,stack (default all three)",
    )
    p.add_argument("--skip-hf", action="store_true", help="leave out the hf variant")
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="measured passes are rounds x repeats; every variant runs once per pass (default 5)",
    )
    p.add_argument("--skip-startup", action="store_true", help="leave out the stage start-up timing")
    p.add_argument(
        "--stack-url",
        default=None,
        help="gateway of a running stack; without it the benchmark starts one itself",
    )
    p.add_argument(
        "--stack-port",
        type=int,
        default=8000,
        help="gateway port of the stack the benchmark starts itself (default 8000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids (default 0)")
    p.add_argument("--out", default=None, help="write every figure to this JSON file")
    args = p.parse_args(argv)

    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency: every level must be >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    if args.skip_hf:
        variants = [v for v in variants if v != "hf"]
    args.variants = [v for v in VARIANTS if v in variants]  # fixed order: the baseline first
    if not args.variants:
        p.error("nothing to run")
    if args.prompt_tokens < 1:
        p.error("--prompt-tokens must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the decode rate needs two tokens)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def check_bundle(bundle: Path, need_reference: bool) -> dict:
    """The bundle's manifest; BenchError (exit 2) with the export command when it is unusable."""
    hint = EXPORT_HINT.format(out=bundle if str(bundle) != DEFAULT_BUNDLE else DEFAULT_BUNDLE)
    if not (bundle / "manifest.json").is_file():
        raise BenchError(
            f"no model bundle at {bundle} (no manifest.json). Make one with\n"
            f"    {EXPORT_HINT.format(out=DEFAULT_BUNDLE)}\n"
            "or pass --bundle DIR.",
            exit_code=2,
        )
    if need_reference and not (bundle / "reference" / "model.onnx").is_file():
        raise BenchError(
            f"the bundle {bundle} has no reference/model.onnx, the monolithic baseline that "
            "`--with-reference` exports. Re-export it with\n"
            f"    {hint}\n"
            "or pass --bundle DIR of a bundle exported with --with-reference.",
            exit_code=2,
        )
    try:
        return json.loads((bundle / "manifest.json").read_text())
    except ValueError as e:
        raise BenchError(f"{bundle}/manifest.json is not valid JSON: {e}", exit_code=2) from e


def make_prompts(manifest: dict, count: int, length: int, seed: int) -> np.ndarray:
    """[count, length] int64 token ids, seeded; row i is the same whatever the count."""
    cfg = manifest.get("config", {})
    vocab = int(cfg.get("vocab_size", 50257))
    eos = cfg.get("eos_token_id")
    rng = np.random.default_rng(seed)
    # Leave out the end-of-text id (the last one in GPT-2's vocabulary) so no prompt holds it.
    high = vocab - 1 if eos == vocab - 1 else vocab
    return rng.integers(0, high, size=(count, length), dtype=np.int64)


def machine_info() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": model or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def summarize(runs: list[dict]) -> dict:
    """The median of each figure over the measured runs."""
    keys = ("first_token_ms", "decode_tok_s_per_stream", "aggregate_tok_s", "wall_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = runs
    return out


def timing(
    t0: float,
    first: list[float],
    last: list[float],
    end: float,
    new_tokens: list[int],
    seen: list[int] | None = None,
) -> dict:
    """Figures for one run: t0 = start, first/last = per-sequence first/last token times,
    new_tokens = tokens per sequence, seen = tokens observed from `first` to `last` (default
    new_tokens; fewer when some streamed chunks carried no text)."""
    c = len(first)
    decode = [
        (n - 1) / (lt - ft) if n > 1 and lt > ft else float("nan")
        for ft, lt, n in zip(first, last, seen or new_tokens, strict=True)
    ]
    return {
        "first_token_ms": 1000.0 * sum(f - t0 for f in first) / c,
        "decode_tok_s_per_stream": float(np.nanmean(decode)) if not all(np.isnan(decode)) else float("nan"),
        "aggregate_tok_s": sum(new_tokens) / (end - t0),
        "wall_s": end - t0,
        "completion_tokens": sum(new_tokens),
    }


# --------------------------------------------------------------------------------------------
# monolith: optimum's whole-model ONNX export, ONNX Runtime, numpy greedy loop


class Monolith:
    def __init__(self, model_path: Path):
        import onnxruntime as ort

        from functions.engine import session_options

        # the stages' own session options, so both sides run ONNX Runtime the same way
        opts = session_options(None)
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        for need in ("input_ids", "attention_mask"):
            if need not in self.inputs:
                raise BenchError(f"{model_path} has no input {need!r}; inputs: {sorted(self.inputs)}")
        if "logits" not in self.output_names:
            raise BenchError(f"{model_path} has no output 'logits'; outputs: {self.output_names}")
        self.past_names = sorted(
            (n for n in self.inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        )
        # present.{i}.key|value -> past_key_values.{i}.key|value
        self.feedback = {}
        for idx, name in enumerate(self.output_names):
            if name.startswith("present."):
                past = "past_key_values." + name[len("present.") :]
                if past not in self.inputs:
                    raise BenchError(f"{model_path}: output {name} has no matching input {past}")
                self.feedback[past] = idx
        missing = set(self.past_names) - set(self.feedback)
        if missing:
            raise BenchError(f"{model_path}: no present output for {sorted(missing)}")
        self.logits_idx = self.output_names.index("logits")
        self.past_shape = {}
        for n in self.past_names:
            shape = self.inputs[n].shape  # (batch, heads, past, head_dim)
            if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise BenchError(f"{model_path}: cannot read heads/head_dim from {n} shape {shape}")
            self.past_shape[n] = (shape[1], shape[3])
        self.has_position_ids = "position_ids" in self.inputs

    def generate(self, prompts: np.ndarray, new_tokens: int) -> dict:
        b, p = prompts.shape
        feed: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(prompts, dtype=np.int64),
            "attention_mask": np.ones((b, p), dtype=np.int64),
        }
        if self.has_position_ids:
            feed["position_ids"] = np.tile(np.arange(p, dtype=np.int64), (b, 1))
        for n in self.past_names:
            heads, dim = self.past_shape[n]
            feed[n] = np.zeros((b, heads, 0, dim), dtype=np.float32)
        out_tokens = np.empty((b, new_tokens), dtype=np.int64)

        t0 = time.perf_counter()
        outs = self.session.run(None, feed)
        nxt = outs[self.logits_idx][:, -1, :].argmax(axis=-1)
        out_tokens[:, 0] = nxt
        t_first = time.perf_counter()
        for step in range(1, new_tokens):
            total = p + step  # positions the model has seen once this token is fed
            feed = {
                "input_ids": nxt.reshape(b, 1).astype(np.int64, copy=False),
                "attention_mask": np.ones((b, total), dtype=np.int64),
            }
            if self.has_position_ids:
                feed["position_ids"] = np.full((b, 1), total - 1, dtype=np.int64)
            for n, idx in self.feedback.items():
                feed[n] = outs[idx]
            outs = self.session.run(None, feed)
            nxt = outs[self.logits_idx][:, -1, :].argmax(axis=-1)
            out_tokens[:, step] = nxt
        t_end = time.perf_counter()

        r = timing(t0, [t_first] * b, [t_end] * b, t_end, [new_tokens] * b)
        r["tokens"] = out_tokens.tolist()
        return r


Runner = Callable[[int], dict]  # concurrency -> the figures of one run (+ "tokens", maybe "texts")


def open_monolith(args, bundle: Path, prompts: np.ndarray) -> Runner:
    path = bundle / "reference" / "model.onnx"
    log(f"[monolith] loading {path}")
    model = Monolith(path)
    return lambda c: model.generate(prompts[:c], args.new_tokens)


# --------------------------------------------------------------------------------------------
# hf: transformers PyTorch generate on the same weights


def load_hf_model(bundle: Path, manifest: dict, tmp: Path):
    """GPT2LMHeadModel with the bundle's weights: a seeded random model is rebuilt the way the
    export built it (the bundle keeps no PyTorch weights); a local HF directory is loaded as is."""
    from transformers import GPT2LMHeadModel

    mid = str(manifest.get("model", {}).get("id", ""))
    revision = str(manifest.get("model", {}).get("revision", ""))
    if mid.startswith("random-init:"):
        from export.source import make_random_model

        kind = mid.split(":", 1)[1]
        if kind not in ("gpt2", "tiny") and not Path(kind).is_file():
            raise BenchError(
                f"the bundle was made from --random-init {kind}, which is not here any more; use --skip-hf"
            )
        m = re.fullmatch(r"seed-(\d+)", revision)
        seed = int(m.group(1)) if m else 0
        tok = bundle / "tokenizer.json"
        log(f"[hf] rebuilding random-init {kind} weights, seed {seed}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_random_model(kind, tmp, tok if tok.is_file() else None, seed=seed)
        src = str(tmp)
    elif Path(mid).is_dir():
        src = mid
    else:
        src = mid  # a hub id: works when it is in the local HF cache or the hub is reachable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GPT2LMHeadModel.from_pretrained(src, revision=None if src != mid else (revision or None))
    except OSError as e:
        raise BenchError(f"could not load the PyTorch weights of {mid!r}: {e}; use --skip-hf") from e
    return model.eval()


class _TokenTimes:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def open_hf(args, bundle: Path, manifest: dict, prompts: np.ndarray, machine: dict) -> Runner:
    import torch
    import transformers

    machine.update(
        torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads()
    )
    with tempfile.TemporaryDirectory(prefix="tandem-bench-hf-") as tmp:
        model = load_hf_model(bundle, manifest, Path(tmp))
    eos = model.config.eos_token_id
    pad = eos if eos is not None else 0
    log(
        f"[hf] torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"attention {model.config._attn_implementation}"
    )

    def once(c: int) -> dict:
        ids = torch.from_numpy(np.ascontiguousarray(prompts[:c]))
        mask = torch.ones_like(ids)
        timer = _TokenTimes()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=pad,
                streamer=timer,
            )
            t_end = time.perf_counter()
        new = out[:, ids.shape[1] :]
        if new.shape[1] != args.new_tokens or len(timer.times) != args.new_tokens:
            raise BenchError(
                f"hf generate returned {new.shape[1]} tokens ({len(timer.times)} steps), "
                f"expected {args.new_tokens}"
            )
        r = timing(t0, [timer.times[0]] * c, [timer.times[-1]] * c, t_end, [args.new_tokens] * c)
        r["tokens"] = new.tolist()
        return r

    return once


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
        "stream_options": {"include_usage": True},
    }
    first = last = None
    counted = 0
    usage_tokens = None
    finish = None
    text: list[str] = []
    done = False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            detail = (await r.aread()).decode(errors="replace")[:500]
            raise BenchError(f"POST {url}/v1/completions answered {r.status_code}: {detail}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError as e:
                raise BenchError(f"the gateway sent an SSE event that is not JSON: {data[:200]!r}") from e
            if "error" in obj:
                raise BenchError(f"the gateway streamed an error: {json.dumps(obj['error'])[:500]}")
            now = time.perf_counter()
            for ch in obj.get("choices") or []:
                n = _chunk_tokens(ch)
                if n:
                    counted += n
                    if first is None:
                        first = now
                    last = now
                if ch.get("text"):
                    text.append(ch["text"])
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
            usage = obj.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
    if not done:
        raise BenchError("the gateway closed the stream without `data: [DONE]`")
    if first is None:
        raise BenchError("the gateway streamed no token")
    return {
        "first": first,
        "last": last,
        "end": time.perf_counter(),
        "tokens": usage_tokens if usage_tokens is not None else counted,
        "seen": counted,
        "tokens_source": "usage" if usage_tokens is not None else "chunks",
        "finish_reason": finish,
        "text": "".join(text),
    }


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
    )
    # Chunk times tell the decode rate only if each chunk carries one token; usage counts the tokens.
    r["tokens_source"] = streams[0]["tokens_source"]
    r["texts"] = [s["text"] for s in streams]
    return r


class StackProcess:
    """`python -m infra.local.stack up --bundle DIR --no-export` as a child process."""

    def __init__(self, bundle: Path, port: int, command: list[str] | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = command or self.default_command(bundle, port)
        self.proc: subprocess.Popen | None = None
        self.log_file = None

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


def open_stack(args, prompts: np.ndarray, bundle: Path, stack: list) -> Runner:
    """The gateway to measure; a stack the benchmark starts itself goes into `stack` (to stop)."""
    if args.stack_url:
        url = args.stack_url.rstrip("/")
    else:
        launcher = StackProcess(bundle, args.stack_port)
        stack.append(launcher)
        url = launcher.start()
    model = stack_model_id(url)
    args.stack_used = {"url": url, "model": model, "started_by_bench": not args.stack_url}
    log(f"[stack] gateway {url}, model {model!r}")
    return lambda c: asyncio.run(_stack_run(url, model, prompts[:c], args.new_tokens))


# --------------------------------------------------------------------------------------------
# checks, ratios, report


def compare_tokens(a: list[list[int]], b: list[list[int]]) -> list[str]:
    """Rows where two greedy outputs differ, with the first differing position."""
    out = []
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        if ra != rb:
            pos = next(
                (k for k, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y), min(len(ra), len(rb))
            )
            out.append(f"row {i} from token {pos}")
    return out


def run_checks(results: dict, bundle: Path) -> dict:
    checks: dict = {}
    mono = results.get("monolith")
    if mono is None:
        return checks
    if "hf" in results:
        for c in mono.keys() & results["hf"].keys():
            diff = compare_tokens(mono[c]["tokens"], results["hf"][c]["tokens"])
            checks[f"monolith_vs_hf_tokens_C{c}"] = "equal" if not diff else "differ: " + "; ".join(diff)
    if "stack" in results:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            checks["monolith_vs_stack_text"] = f"not checked: {e}"
            tok = None
        if tok is not None:
            for c, r in mono.items():
                texts = results["stack"].get(c, {}).get("texts")
                if texts is None:
                    continue
                bad = []
                for i, (ids, got) in enumerate(zip(r["tokens"], texts, strict=True)):
                    want = tok.decode(ids, skip_special_tokens=False)
                    if got != want:
                        # incremental decoding may cut multi-byte characters differently
                        same = got.replace("\ufffd", "") == want.replace("\ufffd", "")
                        bad.append(f"row {i}" + (" (only U+FFFD placement)" if same else ""))
                checks[f"monolith_vs_stack_text_C{c}"] = "equal" if not bad else "differ: " + "; ".join(bad)
    return checks


def ratios(results: dict, levels: list[int]) -> dict:
    """Paired ratios of aggregate tok/s (see `paired`)."""
    out: dict = {}
    for c in levels:
        for v in ("stack", "hf"):
            x = paired(results, (v, c), ("monolith", c))
            if x is not None:
                out[f"{v}/monolith aggregate tok/s, C={c}"] = x
    lo, hi = min(levels), max(levels)
    if hi != lo:
        for v in ("stack", "monolith", "hf"):
            x = paired(results, (v, hi), (v, lo))
            if x is not None:
                out[f"{v} C={hi} / {v} C={lo} aggregate tok/s"] = x
    return out


def targets(results: dict) -> list[tuple[str, float, float, bool]]:
    out = []
    goals = (
        ("stack single stream vs monolith", ("stack", 1), ("monolith", 1), TARGET_STACK_VS_MONOLITH_C1),
        ("stack 16 streams vs stack 1 stream", ("stack", 16), ("stack", 1), TARGET_STACK_SCALING),
    )
    for name, a, b, want in goals:
        r = paired(results, a, b)
        if r is not None:
            out.append((f"{name} (aggregate tok/s, paired)", r, want, r >= want))
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def report(args, machine: dict, results: dict, checks: dict, errors: dict) -> str:
    labels = {
        "monolith": "monolith: optimum ONNX + ORT, KV cache, numpy loop (baseline)",
        "hf": "HF transformers PyTorch `generate`",
        "stack": "tandem stack over HTTP (gateway `/v1/completions`, SSE)",
    }
    lines = [
        f"GPT-2 124M, random weights, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"greedy; {args.rounds * args.repeats} measured passes after 1 warm-up, every variant once per "
        'pass (order rotating), medians over the passes; "vs monolith" is the median of the per-pass '
        "ratios; one run of `python -m tests.benchmarks.bench`",
        "",
    ]
    if results:
        lines += [
            "| variant | streams | first token ms | decode tok/s per stream | aggregate tok/s | vs monolith |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    else:
        lines.append("No variant produced figures.")
    for v in VARIANTS:
        for c, r in results.get(v, {}).items():
            x = paired(results, (v, c), ("monolith", c))
            rel = "1.00x" if v == "monolith" else (f"{x:.2f}x" if x is not None else "n/a")
            lines.append(
                f"| {labels[v]} | {c} | {_fmt(r['first_token_ms'])} | "
                f"{_fmt(r['decode_tok_s_per_stream'])} | {_fmt(r['aggregate_tok_s'])} | {rel} |"
            )
    rat = ratios(results, args.concurrency)
    tgt = targets(results)
    if rat or tgt:
        lines += ["", "Ratios (aggregate tok/s):"]
    for k, x in rat.items():
        lines.append(f"- {k}: {x:.2f}x")
    for name, x, want, ok in tgt:
        lines.append(f"- target {name}: {x:.2f}x, want >= {want}x: {'met' if ok else 'NOT met'}")
    lines += [
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores "
        f"({machine['usable_cores']} usable), onnxruntime {machine['onnxruntime']}, "
        f"Python {machine['python']}, {machine['platform']}",
    ]
    if machine.get("torch"):
        lines[-1] += f", torch {machine['torch']}, transformers {machine.get('transformers')}"
    start_load = machine.get("load_avg_1m_at_start")
    if start_load is not None:
        lines.append(
            f"Load average (1 min): {start_load:.2f} at the start, "
            f"{machine['load_avg_1m_at_end']:.2f} at the end (this run included)"
            + ("; other work was running at the start, so the figures are skewed" if start_load > 0.5 else "")
        )
    if checks:
        lines += ["", "Checks:"]
        for k, v in checks.items():
            lines.append(f"- {k}: {v}")
    for v, e in errors.items():
        lines.append(f"- {v}: FAILED: {e}")
    return "\n".join(lines)


def _jsonable(results: dict) -> dict:
    return {v: {str(c): r for c, r in per.items()} for v, per in results.items()}


def stage_startup(bundle: Path, manifest: dict, repeats: int) -> dict[str, float]:
    """Seconds from spawning `python -m functions.stage` to its /v2/health/ready answering 200
    (ONNX session loaded and a warm-up inference run), median of `repeats`, per stage."""
    import socket
    import subprocess

    import httpx

    out = {}
    for stage in manifest["stages"]:
        times = []
        for _ in range(repeats):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "functions.stage",
                    "--bundle",
                    str(bundle),
                    "--stage",
                    stage["name"],
                    "--port",
                    str(port),
                ],
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while proc.poll() is None and time.perf_counter() - t0 < 60:
                    try:
                        if (
                            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code
                            == 200
                        ):
                            times.append(time.perf_counter() - t0)
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.01)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        if times:
            out[stage["name"]] = statistics.median(times)
    return out


def measure_all(args, bundle: Path, manifest: dict, prompts: np.ndarray, machine: dict, errors: dict) -> dict:
    """{variant: {C: summary}}: every variant loaded side by side, runs interleaved pass by pass."""
    runners: dict[str, Runner] = {}
    stack: list[StackProcess] = []
    runs: dict[str, dict[int, list[dict]]] = {}  # variant -> C -> one run per pass, in pass order
    first: dict[tuple[str, int], dict] = {}  # the warm-up run: tokens and texts to check
    try:
        for v in args.variants:
            try:
                if v == "monolith":
                    runners[v] = open_monolith(args, bundle, prompts)
                elif v == "hf":
                    runners[v] = open_hf(args, bundle, manifest, prompts, machine)
                else:
                    runners[v] = open_stack(args, prompts, bundle, stack)
            except BenchError as e:
                errors[v] = str(e)
                log(f"[{v}] FAILED: {e}")
        runs.update({v: {c: [] for c in args.concurrency} for v in runners})
        passes = args.rounds * args.repeats
        for i in range(-1, passes):  # pass -1 is the warm-up
            log(f"=== {'warm-up' if i < 0 else f'pass {i + 1}/{passes}'}")
            for c in args.concurrency:
                alive = [v for v in runners if v not in errors]
                k = max(i, 0) % max(len(alive), 1)
                for v in alive[k:] + alive[:k]:  # the order rotates from pass to pass
                    time.sleep(SETTLE_S)
                    try:
                        r = runners[v](c)
                    except BenchError as e:
                        errors[v] = str(e)
                        log(f"[{v}] FAILED: {e}")
                        continue
                    log(
                        f"[{v}] C={c}: first token {r['first_token_ms']:.1f} ms, "
                        f"{r['decode_tok_s_per_stream']:.1f} tok/s/stream, "
                        f"{r['aggregate_tok_s']:.1f} tok/s aggregate"
                    )
                    if i < 0:
                        first[(v, c)] = r
                    else:
                        runs[v][c].append({k_: x for k_, x in r.items() if k_ not in ("tokens", "texts")})
    except KeyboardInterrupt:
        errors["run"] = "interrupted"
    finally:
        for launcher in stack:
            launcher.stop()
    results: dict = {}
    for v, levels in runs.items():
        for c, rs in levels.items():
            if rs and v not in errors:
                summary = summarize(rs)
                summary["tokens"] = first[(v, c)].get("tokens")
                if "texts" in first[(v, c)]:
                    summary["texts"] = first[(v, c)]["texts"]
                results.setdefault(v, {})[c] = summary
    return results


def paired(results: dict, a: tuple[str, int], b: tuple[str, int]) -> float | None:
    """Median over passes of aggregate tok/s of a / of b in the same pass."""
    ra = results.get(a[0], {}).get(a[1], {}).get("runs", [])
    rb = results.get(b[0], {}).get(b[1], {}).get("runs", [])
    pairs = [
        x["aggregate_tok_s"] / y["aggregate_tok_s"]
        for x, y in zip(ra, rb, strict=False)
        if y["aggregate_tok_s"]
    ]
    return statistics.median(pairs) if pairs else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = Path(args.bundle)
    try:
        manifest = check_bundle(bundle, need_reference="monolith" in args.variants)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    prompts = make_prompts(manifest, max(args.concurrency), args.prompt_tokens, args.seed)
    machine = machine_info()
    errors: dict = {}
    results = measure_all(args, bundle, manifest, prompts, machine, errors)
    startup = {} if args.skip_startup else stage_startup(bundle, manifest, args.repeats)
    machine["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    checks = run_checks(results, bundle)
    print(report(args, machine, results, checks, errors))
    if startup:
        print(
            "Stage function ready after process start (median of "
            f"{args.repeats}): " + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items())
        )
    for k, val in checks.items():
        if val != "equal" and not val.startswith("not checked"):
            print(
                f"WARNING: {k}: {val}"
                + (" (the monolith greedy loop or the weights do not match HF)" if "hf" in k else ""),
                file=sys.stderr,
            )
    if args.out:
        doc = {
            "config": {
                "bundle": str(bundle),
                "model": manifest.get("model"),
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "concurrency": args.concurrency,
                "repeats": args.repeats,
                "seed": args.seed,
                "variants": args.variants,
                "stack": getattr(args, "stack_used", None),
            },
            "machine": machine,
            "results": _jsonable(results),
            "ratios": ratios(results, args.concurrency),
            "targets": [
                {"name": n, "ratio": x, "want_at_least": w, "met": ok} for n, x, w, ok in targets(results)
            ],
            "checks": checks,
            "stage_ready_seconds": startup,
            "errors": errors,
            "prompt_ids": prompts.tolist(),
        }
        Path(args.out).write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
        log(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
