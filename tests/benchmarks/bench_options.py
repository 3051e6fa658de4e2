"""The benchmark's command line (`python -m tests.benchmarks.bench`, described in its docstring):
the options, their defaults, and the checks on them (a wrong value is a usage error)."""

from __future__ import annotations

import argparse

from tests.benchmarks.common import DEFAULT_BUNDLE, VARIANTS
from tests.benchmarks.stack_client import StackSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench",
        description="Measure the tandem stack against the monolithic ONNX model and HF transformers.",
    )
    _add_options(p)
    args = p.parse_args(argv)
    _check_stacks(p, args)
    _check_workload(p, args)
    return args


def _add_options(p: argparse.ArgumentParser) -> None:
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
    _add_stack_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids (default 0)")
    p.add_argument("--out", default=None, help="write every figure to this JSON file")
    p.add_argument("--plot", default=None, help="draw tok/s and inter-token latency per variant to this PNG")


def _add_stack_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--pipeline-depth",
        type=int,
        default=None,
        help="the started stack's pipeline_depth (lanes of micro-batches; default: the gateway's, 1)",
    )
    p.add_argument(
        "--hop-delay-ms",
        type=float,
        default=0.0,
        help="added to every stage call of the started stack, as if the stages were on other machines",
    )
    p.add_argument(
        "--stacks",
        default="base",
        help="stack configurations to measure side by side, comma-separated: base (the gateway's "
        "defaults) or ':'-joined dN (pipeline depth), Xms (hop delay), int8 (default base)",
    )
    p.add_argument(
        "--int8-bundle", default=None, help="the int8 bundle for int8 stacks (default: BUNDLE-int8)"
    )


def _check_stacks(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        specs = [StackSpec.parse(t, args.pipeline_depth, args.hop_delay_ms) for t in args.stacks.split(",")]
    except ValueError as e:
        p.error(f"--stacks: {e}")
    args.stack_specs = list({sp.name: sp for sp in specs}.values())
    if args.stack_url and len(args.stack_specs) > 1:
        p.error("--stack-url measures one running stack: give one --stacks entry at most")
    args.stack_used = []


def _check_workload(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency: every level must be >= 1")
    args.variants = _variants(p, args)
    if not args.variants:
        p.error("nothing to run")
    for wrong, message in (
        (args.prompt_tokens < 1, "--prompt-tokens must be >= 1"),
        (args.new_tokens < 2, "--new-tokens must be >= 2 (the decode rate needs two tokens)"),
        (args.repeats < 1, "--repeats must be >= 1"),
    ):
        if wrong:
            p.error(message)


def _variants(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    if args.skip_hf:
        variants = [v for v in variants if v != "hf"]
    return [v for v in VARIANTS if v in variants]  # fixed order: the baseline first
