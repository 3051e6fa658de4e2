"""Checks (same tokens across variants), paired ratios against the monolith, and the printed
report."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from tests.benchmarks.common import TARGET_STACK_SCALING, TARGET_STACK_VS_MONOLITH_C1, VARIANTS

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


def jsonable(results: dict) -> dict:
    return {v: {str(c): r for c, r in per.items()} for v, per in results.items()}


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
