"""`python -m infra.local.stack up|down|status`: the whole stack on one machine. Exports the bundle
when needed, starts the tokenizer, every stage replica and the gateway as separate processes,
waits until each is ready, prints the URLs, and stops everything on Ctrl-C or SIGTERM.
Stdlib, httpx and functions.settings (stdlib) only: the launcher never imports torch or onnxruntime."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from functions.bundle import short_name
from functions.settings import Env, SettingsError
from infra.local import frontend, prometheus
from infra.local.export_step import run_export
from infra.local.procs import (
    REPO_ROOT,
    STOP_GRACE_S,
    Signals,
    Stop,
    alive,
    leads_group,
    port_in_use,
    report_failure,
    shown,
    stop_groups,
    wait_ready,
)

# logs, pid file and generated config; TANDEM_STATE_DIR moves them (tests use a temp dir)
STATE_DIR = Path(os.environ.get("TANDEM_STATE_DIR") or REPO_ROOT / ".tandem" / "stack")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_TOKEN_FILE = "auth-token"  # in STATE_DIR, while a stack with --auth runs
AUTO_PIN_MAX_CPUS = 4  # --loop-cpu auto pins on machines this small, where the processes share the cores


@dataclass
class Service:
    name: str
    port: int
    args: list[str]  # completed with --port and --host by services()
    ready_path: str = "/v2/health/ready"


def parse(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Command line > TANDEM_* environment variable > built-in default, for every option."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="python -m infra.local.stack", description=__doc__)
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


def model_name(manifest: dict[str, Any]) -> str:
    """The name clients pass as `model`: the bundle's model id, without path or random-init prefix."""
    return short_name(str(manifest.get("model", {}).get("id", "gpt2")))


def client_host(host: str) -> str:
    """Where to reach a service bound to `host` (a wildcard bind is reached over loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)


def stage_ports(n_stages: int, base: int, replicas: int) -> list[list[int]]:
    """Ports per stage: replicas of one stage on consecutive ports, stages one after another."""
    return [[base + k * replicas + r for r in range(replicas)] for k in range(n_stages)]


def gateway_config(args: argparse.Namespace, model_name: str, stage_names: list[str]) -> dict[str, Any]:
    """The gateway's config.json: one node per replica; model_part is the 0-based stage index."""
    h, n = client_host(args.host), args.replicas
    ports = stage_ports(len(stage_names), args.stage_port_base, n)
    nodes = [
        {"id": name if n == 1 else f"{name}-r{r}", "address": f"{h}:{port}", "model_part": k}
        for k, name in enumerate(stage_names)
        for r, port in enumerate(ports[k])
    ]
    return {"model_name": model_name, "tokenizer": {"address": f"{h}:{args.tokenizer_port}"}, "nodes": nodes}


def services(args: argparse.Namespace, config: dict[str, Any], config_path: Path) -> list[Service]:
    """Tokenizer, then every stage replica in order, then the gateway."""
    py, bundle = sys.executable, str(args.bundle)
    threads = ["--threads", str(args.threads)] if args.threads else []
    out = [Service("tokenizer", args.tokenizer_port, [py, "-m", "functions.tokenizer", "--bundle", bundle])]
    for node in config["nodes"]:
        stage = [py, "-m", "functions.stage", "--bundle", bundle, "--stage", str(node["model_part"] + 1)]
        out.append(Service(node["id"], int(node["address"].rsplit(":", 1)[1]), stage + threads))
    config_arg = ["--config", str(config_path)]
    out.append(Service("gateway", args.gateway_port, [py, "-m", "gateway", *config_arg], "/readyz"))
    for s in out:
        s.args += ["--port", str(s.port), "--host", args.host]
    return out


def frontend_service(args: argparse.Namespace) -> Service | None:
    """The web UI's static server, building the UI first when needed; None (and why) without it."""
    if args.no_frontend:
        return None
    if (why := frontend.build_if_missing()) is not None:
        print(f"[stack] no web UI: {why}; --no-frontend skips it", file=sys.stderr, flush=True)
        return None
    gw = ["--gateway-url", f"http://{client_host(args.host)}:{args.gateway_port}"]
    cmd = [sys.executable, "-m", "infra.local.frontend", *gw, "--port", str(args.frontend_port)]
    return Service("frontend", args.frontend_port, [*cmd, "--host", args.host], "/")


def banner(
    args: argparse.Namespace, config: dict[str, Any], svcs: list[Service], ui: Service | None = None
) -> str:
    h = client_host(args.host)
    gw = f"http://{h}:{args.gateway_port}"
    metrics = "\n".join(f"    {s.name:<12} http://{h}:{s.port}/metrics" for s in svcs)
    body = json.dumps({"model": config["model_name"], "prompt": "Hello, my name is", "max_tokens": 20})
    prom = "".join(f"  prometheus    http://127.0.0.1:{s.port}\n" for s in svcs if s.name == "prometheus")
    return (
        f"\ntandem is up: {config['model_name']}, {len(config['nodes'])} stage processes. Ctrl-C stops everything.\n"
        + (f"  web UI        http://{h}:{ui.port}/\n" if ui else "")
        + f"  gateway API   {gw}/v1/completions  (OpenAI-compatible), {gw}/api/model/process\n"
        f"  models        {gw}/v1/models\n  OpenAPI docs  {gw}/docs\n  metrics\n{metrics}\n{prom}"
        f"  logs          {shown(STATE_DIR / 'logs')}/\n  try\n"
        f"    curl -s {gw}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n"
    )


def service_token(args: argparse.Namespace, given: str | None) -> dict[str, str]:
    """TANDEM_AUTH_TOKEN for the services: the one given, or a fresh one when --auth asks for it or
    the stack listens beyond loopback; written (mode 0600) where `AUTH_TOKEN_FILE` says, for
    calling a function directly. Empty when the functions stay open."""
    path = STATE_DIR / AUTH_TOKEN_FILE
    path.unlink(missing_ok=True)
    loopback = args.host in LOOPBACK
    if not given and not args.auth and loopback:
        return {}
    token = given or secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    print(f"[stack] functions require the service token ({shown(path)})", flush=True)
    return {"TANDEM_AUTH_TOKEN": token}


def up(args: argparse.Namespace) -> int:
    pid_file = STATE_DIR / "pids.json"
    if pid_file.exists() and alive(json.loads(pid_file.read_text())["launcher"]):
        print(
            "[stack] a stack is already running; `python -m infra.local.stack down` stops it", file=sys.stderr
        )
        return 1
    if args.no_export:
        if not (args.bundle / "manifest.json").is_file():
            print(f"[stack] --no-export: {args.bundle} has no manifest.json", file=sys.stderr)
            return 1
    elif not run_export(args):
        return 1
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    config = gateway_config(args, model_name(manifest), [s["name"] for s in manifest["stages"]])
    (STATE_DIR / "logs").mkdir(parents=True, exist_ok=True)
    config_path = STATE_DIR / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    svcs = services(args, config, config_path)
    stage_names = [s["name"] for s in manifest["stages"]]
    if prom := prometheus.plan(args, config, stage_names, STATE_DIR / "prometheus"):
        svcs.append(Service("prometheus", prom.port, prom.args, prometheus.READY_PATH))
    ui = frontend_service(args)
    everything = svcs + ([ui] if ui else [])
    busy = [f"{s.name} port {s.port}" for s in everything if port_in_use(args.host, s.port)]
    if busy:
        print(f"[stack] in use: {', '.join(busy)}; free them or choose other ports", file=sys.stderr)
        return 1

    urls = {s.name: f"http://{client_host(args.host)}:{s.port}{s.ready_path}" for s in everything}
    child_env = {k: v for k, v in os.environ.items() if k != "TANDEM_LOOP_CPU"}
    child_env |= service_token(args, child_env.get("TANDEM_AUTH_TOKEN"))
    child_env.setdefault("TANDEM_CORS_ORIGINS", frontend.cors_origins(args.frontend_port))
    if args.host in LOOPBACK:  # a page elsewhere that resolves its name to 127.0.0.1 gets a 400
        child_env.setdefault("TANDEM_ALLOWED_HOSTS", ",".join(LOOPBACK))
    if args.loop_cpu is not None:
        child_env["TANDEM_LOOP_CPU"] = str(args.loop_cpu)
        print(
            f"[stack] event loops pinned to CPU {args.loop_cpu}, ONNX Runtime computes on the others "
            "(--loop-cpu none turns this off)",
            flush=True,
        )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    try:
        Signals.defer = True
        for s in everything:
            with open(STATE_DIR / "logs" / f"{s.name}.log", "wb") as log:
                # Own session, so own process group: the terminal's Ctrl-C reaches only the
                # launcher, which then stops every group itself.
                procs[s.name] = subprocess.Popen(
                    s.args,
                    cwd=REPO_ROOT,
                    env=child_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        services_state = [{"name": n, "pid": p.pid, "url": urls[n]} for n, p in procs.items()]
        pid_file.write_text(json.dumps({"launcher": os.getpid(), "services": services_state}, indent=2))
        Signals.resume()
        if wait_ready(procs, urls, args.ready_timeout, STATE_DIR / "logs") is not None:
            return 1
        print(banner(args, config, svcs, ui), flush=True)
        while True:  # foreground: a service that dies later takes the stack down with it
            for name, p in procs.items():
                if p.poll() is not None:
                    report_failure(STATE_DIR / "logs", name, f"exited with {p.returncode}")
                    return 1
            time.sleep(0.5)
    except Stop:
        print("\n[stack] stopping", flush=True)
        return 0
    finally:
        for sig in stop_signals:  # let the shutdown finish
            signal.signal(sig, signal.SIG_IGN)
        stop_groups([p.pid for p in reversed(procs.values())])
        pid_file.unlink(missing_ok=True)
        if procs:
            print("[stack] stopped", flush=True)


def read_pids() -> dict[str, Any] | None:
    path = STATE_DIR / "pids.json"
    if path.exists():
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    print(f"[stack] no stack running (no {shown(path)})")
    return None


def down() -> int:
    if (state := read_pids()) is None:
        return 0
    if alive(launcher := state["launcher"]):  # the launcher stops its services itself, in order
        os.kill(launcher, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S + 5
        while alive(launcher) and time.monotonic() < deadline:
            time.sleep(0.1)
    # A launcher killed outright leaves its services behind: stop their groups directly, but only
    # pids that still lead their own group (a recycled pid would not).
    stop_groups([s["pid"] for s in state["services"] if alive(s["pid"]) and leads_group(s["pid"])])
    (STATE_DIR / "pids.json").unlink(missing_ok=True)
    print("[stack] stopped")
    return 0


def status() -> int:
    if (state := read_pids()) is None:
        return 1
    all_ready = True
    with httpx.Client(timeout=1.0) as client:
        for s in state["services"]:
            try:
                ready = alive(s["pid"]) and client.get(s["url"]).status_code == 200
            except httpx.TransportError:
                ready = False
            all_ready &= ready
            state_word = "ready" if ready else ("running, not ready" if alive(s["pid"]) else "exited")
            print(f"{s['name']:<12} pid {s['pid']:<8} {state_word:<20} {s['url']}")
    return 0 if all_ready else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "down":
        return down()
    if args.command == "status":
        return status()
    signal.signal(signal.SIGINT, Signals.handle)
    signal.signal(signal.SIGTERM, Signals.handle)
    try:
        return up(args)
    except Stop:  # during the export, before any service started
        return 0


if __name__ == "__main__":
    sys.exit(main())
