"""The launcher's command line (`python -m infra.local.stack up|down|status`): every option, with
the TANDEM_* environment variable that sets it (command line > variable > built-in default).
Stdlib and functions.settings only."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from functions.settings import Env, SettingsError
from infra.local import frontend
from infra.local.procs import REPO_ROOT

AUTH_TOKEN_FILE = "auth-token"  # in the state directory, while a stack with --auth runs
AUTO_PIN_MAX_CPUS = 4  # --loop-cpu auto pins on machines this small, where the processes share the cores
DESCRIPTION = """The whole stack on one machine. Exports the bundle when needed, starts the
tokenizer, every stage replica and the gateway as separate processes, waits until each is ready,
prints the URLs, and stops everything on Ctrl-C or SIGTERM."""


def parse(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Command line > TANDEM_* environment variable > built-in default, for every option."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="python -m infra.local.stack", description=DESCRIPTION)
    p.add_argument("command", choices=["up", "down", "status"])

    def opt(flag: str, default: Any = None, **kw: Any) -> None:
        var = "TANDEM_" + flag.lstrip("-").replace("-", "_").upper()
        if kw.get("action") == "store_true":
            try:
                default = Env(env).flag(var)
            except SettingsError as e:
                p.error(str(e))
        elif var in env:
            default = env[var]  # argparse applies `type` to string defaults
        kw["help"] = f"{kw.get('help', '')} [env {var}]".strip()
        p.add_argument(flag, default=default, **kw)

    declare(opt)
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    try:
        args.loop_cpu = resolve_loop_cpu(str(args.loop_cpu))
    except ValueError as e:
        p.error(str(e))
    if args.bundle is None:
        name = f"{Path(args.random_init).stem}-random" if args.random_init else Path(args.model).name
        name += f"-{args.quantize}" if args.quantize else ""
        args.bundle = REPO_ROOT / "bundles" / name
    args.bundle = Path(args.bundle).resolve()
    return args


def declare(opt: Callable[..., None]) -> None:
    """Every option: opt(flag, default, **argparse keywords)."""
    opt("--bundle", help="bundle directory (default bundles/gpt2, or bundles/<kind>-random)")
    opt("--model", "gpt2", help="hub id or local HF directory to export (default gpt2)")
    shapes = "gpt2, llama, qwen2 ..., FAMILY-tiny: `python -m export --help`"
    opt("--random-init", metavar="SHAPE", help=f"export seeded random weights of a shape ({shapes}) instead")
    opt("--tokenizer", metavar="PATH", help="tokenizer for --random-init (encoder.json + vocab.bpe dir)")
    opt(
        "--quantize",
        choices=["int8"],
        help="serve a dynamically int8-quantised export (weights int8, activations float; bundle "
        "name gets -int8); the export prints its logit drift and top-1 agreement against PyTorch",
    )
    opt("--host", "127.0.0.1", help="interface every service binds (default 127.0.0.1)")
    opt("--gateway-port", 8000, type=int)
    opt("--tokenizer-port", 8100, type=int)
    opt("--stage-port-base", 8101, type=int, help="first stage port; replicas take consecutive ports")
    opt("--replicas", 1, type=int, help="replicas per stage (default 1)")
    opt("--threads", type=int, help="ONNX Runtime threads per stage process")
    opt(
        "--loop-cpu",
        "auto",
        help="pin every service's event loop to this CPU, leaving ONNX Runtime's compute threads the "
        "others: a CPU number, 'none', or 'auto' (the first usable CPU on machines with at most "
        f"{AUTO_PIN_MAX_CPUS}; default)",
    )
    opt("--ready-timeout", 120.0, type=float, help="seconds to wait for readiness (default 120)")
    opt("--no-export", action="store_true", help="use the bundle as it is; never run the export")
    opt("--no-prometheus", action="store_true", help="do not start Prometheus (infra/local/prometheus.py)")
    opt("--prometheus-port", 9090, type=int, help="Prometheus on 127.0.0.1 (default 9090)")
    opt("--frontend-port", frontend.DEFAULT_PORT, type=int, help="the web UI's port (default 5173)")
    opt("--no-frontend", action="store_true", help="neither build nor serve the web UI")
    opt(
        "--auth",
        action="store_true",
        help="functions accept only calls with the service token (TANDEM_AUTH_TOKEN if set, else one "
        f"generated for this run, in {AUTH_TOKEN_FILE}); always on when --host is not loopback",
    )


def resolve_loop_cpu(value: str, cpus: set[int] | None = None) -> int | None:
    """`--loop-cpu` as a CPU number or None (no pinning)."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    value = value.strip().lower()
    if value in ("none", ""):
        return None
    if value == "auto":
        return min(cpus) if 1 < len(cpus) <= AUTO_PIN_MAX_CPUS else None
    if not value.isdigit() or int(value) not in cpus:
        raise ValueError(
            f"--loop-cpu must be 'auto', 'none' or one of the usable CPUs {sorted(cpus)}, got {value!r}"
        )
    return int(value)
