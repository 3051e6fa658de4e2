"""Benchmark: the tandem stack against the same model run monolithically, in one run.

    python -m tests.benchmarks.bench [--bundle DIR] [--prompt-tokens 32] [--new-tokens 64]
        [--concurrency 1,16] [--repeats 3] [--variants monolith,hf,stack] [--stack-url URL]
        [--skip-hf] [--out FILE.json] [--plot FILE.png] [--stacks SPEC,SPEC,...]
        [--pipeline-depth D] [--hop-delay-ms MS] [--int8-bundle DIR]

Variants, run one after the other (never at the same time: they share the CPU):
  monolith  DIR/reference/model.onnx (the whole model exported by optimum, with KV cache) run by
            ONNX Runtime in this process, greedy loop in numpy, KV cache fed back each step.
            This is the baseline.
  hf        transformers PyTorch `AutoModelForCausalLM.generate`, greedy, on the same weights (the
            seeded random model is rebuilt the way the export built it).
  stack     the tandem stack over HTTP: the gateway's OpenAI-compatible streaming
            `POST /v1/completions`. Without --stack-url the benchmark starts
            `python -m infra.local.stack up --bundle DIR --no-export` itself and stops it at the end.
            --stacks measures several configurations side by side, each its own stack: `:`-joined
            tokens, dN (pipeline depth N), Xms (X ms added to every stage call, as if the stages
            were on other machines), int8 (the int8 bundle, DIR-int8 or --int8-bundle); `base` is
            the gateway's defaults. Example: --stacks base,d1,d3,d1:5ms,d3:5ms,int8

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
  inter-token p50/p99    over every gap between two tokens of one sequence, all sequences
--out writes every figure as JSON; --plot draws aggregate tok/s and inter-token p50 against the
number of streams, one line per variant (PNG).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.bench_options import parse_args
from tests.benchmarks.common import (
    REPO_ROOT,
    SETTLE_S,
    BenchError,
    Runner,
    check_bundle,
    log,
    machine_info,
    make_prompts,
    summarize,
)
from tests.benchmarks.inprocess import open_hf, open_monolith
from tests.benchmarks.report import jsonable, ratios, report, run_checks, targets
from tests.benchmarks.stack_client import StackProcess, open_stack


def stage_startup(bundle: Path, manifest: dict, repeats: int) -> dict[str, float]:
    """Seconds from spawning `python -m functions.stage` to its /v2/health/ready answering 200
    (ONNX session loaded and a warm-up inference run), median of `repeats`, per stage."""
    import socket

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
    stack: list[StackProcess] = []
    runs: dict[str, dict[int, list[dict]]] = {}  # variant -> C -> one run per pass, in pass order
    first: dict[tuple[str, int], dict] = {}  # the warm-up run: tokens and texts to check
    try:
        runners = _open_runners(args, bundle, manifest, prompts, machine, errors, stack)
        runs.update({v: {c: [] for c in args.concurrency} for v in runners})
        passes = args.rounds * args.repeats
        for i in range(-1, passes):  # pass -1 is the warm-up
            log(f"=== {'warm-up' if i < 0 else f'pass {i + 1}/{passes}'}")
            for c in args.concurrency:
                alive = [v for v in runners if v not in errors]
                k = max(i, 0) % max(len(alive), 1)
                for v in alive[k:] + alive[:k]:  # the order rotates from pass to pass
                    r = _run_once(runners, v, c, errors)
                    if r is not None and i < 0:
                        first[(v, c)] = r
                    elif r is not None:
                        runs[v][c].append({k_: x for k_, x in r.items() if k_ not in ("tokens", "texts")})
    except KeyboardInterrupt:
        errors["run"] = "interrupted"
    finally:
        for launcher in stack:
            if launcher.record is not None:  # after the runs: KV caches freed, arenas kept
                launcher.record["stage_rss_bytes"] = launcher.memory()
            launcher.stop()
    return _summaries(runs, first, errors)


def _open_runners(
    args, bundle: Path, manifest: dict, prompts: np.ndarray, machine: dict, errors: dict, stack: list
) -> dict[str, Runner]:
    """Every variant loaded (a stack started for each --stacks entry, recorded in `stack`); one that
    fails to load is in `errors`, not in the answer."""
    names = [v for v in args.variants if v != "stack"]
    names += [sp.name for sp in args.stack_specs] if "stack" in args.variants else []
    specs = {sp.name: sp for sp in args.stack_specs}
    opens = {
        "monolith": lambda: open_monolith(args, bundle, prompts),
        "hf": lambda: open_hf(args, bundle, manifest, prompts, machine),
    }
    runners: dict[str, Runner] = {}
    for v in names:
        try:
            runners[v] = (
                opens[v]() if v in opens else open_stack(args, specs[v], len(stack), prompts, bundle, stack)
            )
        except BenchError as e:
            errors[v] = str(e)
            log(f"[{v}] FAILED: {e}")
    return runners


def _run_once(runners: dict[str, Runner], v: str, c: int, errors: dict) -> dict | None:
    """One run of variant `v` with C sequences, after the settling pause; None if it failed."""
    time.sleep(SETTLE_S)
    try:
        r = runners[v](c)
    except BenchError as e:
        errors[v] = str(e)
        log(f"[{v}] FAILED: {e}")
        return None
    log(
        f"[{v}] C={c}: first token {r['first_token_ms']:.1f} ms, "
        f"{r['decode_tok_s_per_stream']:.1f} tok/s/stream, "
        f"{r['aggregate_tok_s']:.1f} tok/s aggregate"
    )
    return r


def _summaries(
    runs: dict[str, dict[int, list[dict]]], first: dict[tuple[str, int], dict], errors: dict
) -> dict:
    """{variant: {C: summary}} of the measured runs, with the warm-up run's tokens and texts."""
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


def memory_line(used: dict) -> str:
    """Each stage process's resident memory against its own files, for one measured stack."""
    try:
        stages = {
            s["name"]: s for s in json.loads((Path(used["bundle"]) / "manifest.json").read_text())["stages"]
        }
    except (OSError, ValueError, KeyError):
        stages = {}
    parts = [
        f"{name} {rss / 1e6:.0f} MB (files {stages.get(name, {}).get('bytes', 0) / 1e6:.0f} MB)"
        for name, rss in used.get("stage_rss_bytes", {}).items()
    ]
    return f"[{used['variant']}] stage memory after the runs: " + (", ".join(parts) or "not measured")


def model_label(manifest: dict) -> str:
    """ "llama random-init:llama (SmolLM2-135M shape), 134.5M parameters, random weights"-like."""
    cfg, model = manifest.get("config", {}), manifest.get("model", {})
    h, v, n = cfg.get("hidden_size"), cfg.get("vocab_size"), len(manifest.get("stages", []))
    weights = "random weights" if str(model.get("id", "")).startswith("random-init:") else "trained weights"
    return (
        f"{cfg.get('family', 'gpt2')} {model.get('id')} ({cfg.get('num_layers')} layers, hidden {h}, "
        f"vocab {v}), {weights}, {n} stages"
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the stacks this run started are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    bundle = Path(args.bundle)
    try:
        manifest = check_bundle(bundle, need_reference="monolith" in args.variants)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    prompts = make_prompts(manifest, max(args.concurrency), args.prompt_tokens, args.seed)
    args.model_label = model_label(manifest)
    machine = machine_info()
    errors: dict = {}
    results = measure_all(args, bundle, manifest, prompts, machine, errors)
    startup = {} if args.skip_startup else stage_startup(bundle, manifest, args.repeats)
    machine["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    checks = run_checks(results, bundle)
    print(report(args, machine, results, checks, errors))
    for used in args.stack_used:
        print(memory_line(used))
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
                "stacks": args.stack_used,
            },
            "machine": machine,
            "results": jsonable(results),
            "ratios": ratios(results, args.concurrency),
            "targets": [
                {"name": n, "ratio": x, "want": w, "met": ok}
                for n, x, w, ok in targets(results, args.stack_specs[0].name)
            ],
            "checks": checks,
            "stage_ready_seconds": startup,
            "errors": errors,
            "prompt_ids": prompts.tolist(),
        }
        Path(args.out).write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
        log(f"wrote {args.out}")
    if args.plot and results:
        from tests.benchmarks.plot import plot

        plot(results, args, Path(args.plot))
        log(f"wrote {args.plot}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
