"""Checks (same tokens across variants), paired ratios against the monolith, and the printed
report."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from tests.benchmarks.common import (
    TARGET_DELAY_5MS_VS_NONE,
    TARGET_INT8_VS_FP32,
    TARGET_STACK_SCALING,
    TARGET_STACK_VS_MONOLITH_C1,
    TARGET_STACK_VS_MONOLITH_C16,
    TARGET_STAGES_VS_ONE,
    TARGET_TTFT_VS_MONOLITH,
)
from tests.benchmarks.stack_client import StackSpec

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
    mono = results.get("monolith")
    if mono is None:
        return {}
    checks = _hf_checks(mono, results.get("hf"))
    # int8 is not meant to match fp32
    stacks = [v for v in results if v.startswith("stack") and not v.startswith("stack:int8")]
    if not stacks:
        return checks
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        checks["monolith_vs_stack_text"] = f"not checked: {e}"
        return checks
    for c, r in mono.items():
        wants = [tok.decode(ids, skip_special_tokens=False) for ids in r["tokens"]]  # once per level
        for v in stacks:
            texts = results[v].get(c, {}).get("texts")
            if texts is not None:
                checks[f"monolith_vs_{v}_text_C{c}"] = _text_check(wants, texts)
    return checks


def _hf_checks(mono: dict, hf: dict | None) -> dict:
    """The monolith's greedy tokens against HF's, per level both ran."""
    checks: dict = {}
    if hf is None:
        return checks
    for c in mono.keys() & hf.keys():
        diff = compare_tokens(mono[c]["tokens"], hf[c]["tokens"])
        checks[f"monolith_vs_hf_tokens_C{c}"] = "equal" if not diff else "differ: " + "; ".join(diff)
    return checks


def _text_check(wants: list[str], texts: list[str]) -> str:
    """A stack's streamed texts against the monolith's decoded tokens, row by row."""
    bad = []
    for i, (want, got) in enumerate(zip(wants, texts, strict=True)):
        if got != want:
            # incremental decoding may cut multi-byte characters differently
            same = got.replace("\ufffd", "") == want.replace("\ufffd", "")
            bad.append(f"row {i}" + (" (only U+FFFD placement)" if same else ""))
    return "equal" if not bad else "differ: " + "; ".join(bad)


def ratios(results: dict, levels: list[int]) -> dict:
    """Paired ratios of aggregate tok/s (see `paired`): every variant against the monolith at each
    level, each variant's highest level against its lowest, and every stack with a hop delay
    against the same stack without it."""
    others = [v for v in results if v != "monolith"]
    named: list[tuple[str, tuple[str, int], tuple[str, int]]] = [
        (f"{v}/monolith aggregate tok/s, C={c}", (v, c), ("monolith", c)) for c in levels for v in others
    ]
    lo, hi = min(levels), max(levels)
    if hi != lo:
        named += [(f"{v} C={hi} / {v} C={lo} aggregate tok/s", (v, hi), (v, lo)) for v in results]
    for v in (v for v in others if v.startswith("stack")):
        spec = _spec(v)
        base = spec.without_delay().name
        if spec.delay_ms and base in results:
            named += [(f"{v}/{base} aggregate tok/s, C={c}", (v, c), (base, c)) for c in levels]
    out: dict = {}
    for name, a, b in named:
        x = paired(results, a, b)
        if x is not None:
            out[name] = x
    return out


def _same_depth(variant: str, depths: set[int | None]) -> bool:
    spec = _spec(variant)
    return not spec.int8 and not spec.delay_ms and spec.depth in depths


def _spec(variant: str) -> StackSpec:
    return StackSpec.parse(variant.removeprefix("stack"), None, 0.0)


Target = tuple[str, float, str, bool]  # name, ratio, wanted (">= 0.95"), met


def targets(results: dict, main: str = "stack") -> list[Target]:
    """The performance issue's targets, for the variants this run measured. `main` (the first of
    --stacks) stands for the stack."""
    goals: list[tuple[str, tuple[str, int], tuple[str, int], float, str]] = [
        (f"{main} single stream vs monolith", (main, 1), ("monolith", 1), TARGET_STACK_VS_MONOLITH_C1, "tok"),
        (
            f"{main} first token vs monolith, 1 stream",
            (main, 1),
            ("monolith", 1),
            TARGET_TTFT_VS_MONOLITH,
            "ttft",
        ),
        (f"{main} 16 streams vs monolith", (main, 16), ("monolith", 16), TARGET_STACK_VS_MONOLITH_C16, "tok"),
        (f"{main} 16 streams vs 1 stream", (main, 16), (main, 1), TARGET_STACK_SCALING, "tok"),
    ]
    for v in (v for v in results if v.startswith("stack:")):
        spec = _spec(v)
        if spec.delay_ms == 5 and spec.without_delay().name in results:
            base = spec.without_delay().name
            goals.append((f"{v} vs {base}, 16 streams", (v, 16), (base, 16), TARGET_DELAY_5MS_VS_NONE, "tok"))
        one = StackSpec(spec.depth, spec.delay_ms, spec.int8, 1).name
        if spec.stages not in (None, 1) and one in results:
            goals.append((f"{v} vs {one}, 1 stream", (v, 1), (one, 1), TARGET_STAGES_VS_ONE, "tok"))
        if spec.int8 and not spec.delay_ms:
            # the float stack of the same depth; no depth given is the gateway's default, 1
            same = {spec.depth} | ({None, 1} if spec.depth in (None, 1) else set())
            fp32 = [u for u in results if u.startswith("stack") and _same_depth(u, same)]
            if fp32:
                goals.append(
                    (f"{v} vs {fp32[0]}, 1 stream", (v, 1), (fp32[0], 1), TARGET_INT8_VS_FP32, "tok")
                )
    out = []
    for name, a, b, want, kind in goals:
        if kind == "ttft":
            r = paired(results, a, b, "first_token_ms")
            if r is not None:
                out.append((f"{name} (first token ms, paired)", r, f"<= {want}", r <= want))
        else:
            r = paired(results, a, b)
            if r is not None:
                out.append((f"{name} (aggregate tok/s, paired)", r, f">= {want}", r >= want))
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def report(args, machine: dict, results: dict, checks: dict, errors: dict) -> str:
    model = getattr(args, "model_label", "GPT-2 124M, random weights")
    lines = [
        f"{model}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"greedy; {args.rounds * args.repeats} measured passes after 1 warm-up, every variant once per "
        'pass (order rotating), medians over the passes; "vs monolith" is the median of the per-pass '
        "ratios; one run of `python -m tests.benchmarks.bench`",
        "",
    ]
    lines += _table_lines(results)
    lines += _ratio_lines(args, results)
    lines += _hop_lines(results)
    lines += _machine_lines(machine)
    if checks:
        lines += ["", "Checks:"]
        lines += [f"- {k}: {v}" for k, v in checks.items()]
    lines += [f"- {v}: FAILED: {e}" for v, e in errors.items()]
    return "\n".join(lines)


_LABELS = {
    "monolith": "monolith: optimum ONNX + ORT, KV cache, numpy loop (baseline)",
    "hf": "HF transformers PyTorch `generate`",
}


def _table_lines(results: dict) -> list[str]:
    """The table: one row per variant and level."""
    if not results:
        return ["No variant produced figures."]
    lines = [
        "| variant | streams | first token ms | decode tok/s per stream | inter-token p50 / p99 ms "
        "| aggregate tok/s | vs monolith |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, per in results.items():
        for c, r in per.items():
            x = paired(results, (v, c), ("monolith", c))
            rel = "1.00x" if v == "monolith" else (f"{x:.2f}x" if x is not None else "n/a")
            lines.append(
                f"| {_LABELS[v] if v in _LABELS else _stack_label(v)} | {c} | {_fmt(r['first_token_ms'])} | "
                f"{_fmt(r['decode_tok_s_per_stream'])} | {_fmt(r.get('itl_p50_ms'))} / "
                f"{_fmt(r.get('itl_p99_ms'))} | {_fmt(r['aggregate_tok_s'])} | {rel} |"
            )
    return lines


def _ratio_lines(args, results: dict) -> list[str]:
    rat = ratios(results, args.concurrency)
    tgt = targets(results, args.stack_specs[0].name if getattr(args, "stack_specs", None) else "stack")
    lines = ["", "Ratios (aggregate tok/s):"] if rat or tgt else []
    lines += [f"- {k}: {x:.2f}x" for k, x in rat.items()]
    lines += [
        f"- target {name}: {x:.2f}x, want {want}x: {'met' if ok else 'NOT met'}" for name, x, want, ok in tgt
    ]
    return lines


def _hop_lines(results: dict) -> list[str]:
    hops = [
        (v, c, r) for v, per in results.items() for c, r in per.items() if r.get("hop_overhead_p50_ms", 0) > 0
    ]
    if not hops:
        return []
    lines = [
        "",
        "Per-hop overhead (a stage call's time outside the stage's session, from the gateway's "
        "tandem_stage_hop_overhead_seconds; a simulated delay counts in it):",
    ]
    for v, c, r in hops:
        lines.append(
            f"- {v}, {c} stream(s): p50 {r['hop_overhead_p50_ms']:.2f} ms, mean {r['hop_overhead_mean_ms']:.2f} ms"
        )
    return lines


def _machine_lines(machine: dict) -> list[str]:
    lines = [
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
    return lines


def _stack_label(v: str) -> str:
    spec = _spec(v)
    words = ["tandem stack over HTTP (`/v1/completions`, SSE)"]
    words += [f"{spec.stages} stage{'s' if spec.stages > 1 else ''}"] if spec.stages is not None else []
    words += ["int8 bundle"] if spec.int8 else []
    words += [f"pipeline depth {spec.depth}"] if spec.depth is not None else []
    words += [f"+{spec.delay_ms:g} ms per stage call"] if spec.delay_ms else []
    return words[0] + (": " + ", ".join(words[1:]) if len(words) > 1 else "")


def jsonable(results: dict) -> dict:
    return {v: {str(c): r for c, r in per.items()} for v, per in results.items()}


def paired(
    results: dict, a: tuple[str, int], b: tuple[str, int], key: str = "aggregate_tok_s"
) -> float | None:
    """Median over passes of a figure (aggregate tok/s) of a / of b in the same pass."""
    ra = results.get(a[0], {}).get(a[1], {}).get("runs", [])
    rb = results.get(b[0], {}).get(b[1], {}).get("runs", [])
    pairs = [x[key] / y[key] for x, y in zip(ra, rb, strict=False) if y[key]]
    return statistics.median(pairs) if pairs else None
