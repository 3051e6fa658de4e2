"""`python -m infra.local.stack up|down|status`: the whole stack on one machine. Exports the bundle
when needed, starts the tokenizer, every stage replica and the gateway as separate processes,
waits until each is ready, prints the URLs, and stops everything on Ctrl-C or SIGTERM. The command
line lives in infra/local/options.py, what is started in infra/local/plan.py.
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
from typing import Any

import httpx

from infra.local import frontend, prometheus
from infra.local.export_step import run_export
from infra.local.options import AUTH_TOKEN_FILE, parse
from infra.local.plan import (
    STATE_DIR,
    Service,
    banner,
    client_host,
    frontend_service,
    gateway_config,
    model_name,
    services,
)
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

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def plan_run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Service], Service | None] | None:
    """Export if needed, write the gateway's config, list the services (tokenizer, stages, gateway,
    Prometheus) and the UI; None (having said why) when the stack cannot start."""
    if args.no_export:
        if not (args.bundle / "manifest.json").is_file():
            print(f"[stack] --no-export: {args.bundle} has no manifest.json", file=sys.stderr)
            return None
    elif not run_export(args):
        return None
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    stage_names = [s["name"] for s in manifest["stages"]]
    config = gateway_config(args, model_name(manifest), stage_names)
    (STATE_DIR / "logs").mkdir(parents=True, exist_ok=True)
    config_path = STATE_DIR / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    svcs = services(args, config, config_path)
    if prom := prometheus.plan(args, config, stage_names, STATE_DIR / "prometheus"):
        svcs.append(Service("prometheus", prom.port, prom.args, prometheus.READY_PATH))
    ui = frontend_service(args)
    busy = [f"{s.name} port {s.port}" for s in svcs + ([ui] if ui else []) if port_in_use(args.host, s.port)]
    if busy:
        print(f"[stack] in use: {', '.join(busy)}; free them or choose other ports", file=sys.stderr)
        return None
    return config, svcs, ui


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The services' environment: this one's, with the service token, CORS origins, allowed hosts
    and the event-loop CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_LOOP_CPU"}
    env |= service_token(args, env.get("TANDEM_AUTH_TOKEN"))
    env.setdefault("TANDEM_CORS_ORIGINS", frontend.cors_origins(args.frontend_port))
    if args.host in LOOPBACK:  # a page elsewhere that resolves its name to 127.0.0.1 gets a 400
        env.setdefault("TANDEM_ALLOWED_HOSTS", ",".join(LOOPBACK))
    if args.loop_cpu is not None:
        env["TANDEM_LOOP_CPU"] = str(args.loop_cpu)
        print(
            f"[stack] event loops pinned to CPU {args.loop_cpu}, ONNX Runtime computes on the others "
            "(--loop-cpu none turns this off)",
            flush=True,
        )
    return env


def launch(
    args: argparse.Namespace,
    everything: list[Service],
    env: dict[str, str],
    procs: dict[str, subprocess.Popen[bytes]],
) -> None:
    """Start every service at once into `procs` (filled as they start, so that whatever started is
    stopped whatever happens) and record their pids."""
    Signals.defer = True
    for s in everything:
        with open(STATE_DIR / "logs" / f"{s.name}.log", "wb") as log:
            # Own session, so own process group: the terminal's Ctrl-C reaches only the
            # launcher, which then stops every group itself.
            procs[s.name] = subprocess.Popen(
                s.args,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    urls = ready_urls(args, everything)
    state = [{"name": n, "pid": p.pid, "url": urls[n]} for n, p in procs.items()]
    (STATE_DIR / "pids.json").write_text(json.dumps({"launcher": os.getpid(), "services": state}, indent=2))
    Signals.resume()


def ready_urls(args: argparse.Namespace, svcs: list[Service]) -> dict[str, str]:
    return {s.name: f"http://{client_host(args.host)}:{s.port}{s.ready_path}" for s in svcs}


def supervise(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    """Foreground until a stop signal (raises Stop): a service that dies takes the stack down."""
    while True:
        for name, p in procs.items():
            if p.poll() is not None:
                report_failure(STATE_DIR / "logs", name, f"exited with {p.returncode}")
                return 1
        time.sleep(0.5)


def up(args: argparse.Namespace) -> int:
    pid_file = STATE_DIR / "pids.json"
    if pid_file.exists() and alive(json.loads(pid_file.read_text())["launcher"]):
        print(
            "[stack] a stack is already running; `python -m infra.local.stack down` stops it", file=sys.stderr
        )
        return 1
    if (planned := plan_run(args)) is None:
        return 1
    config, svcs, ui = planned
    everything = svcs + ([ui] if ui else [])
    env = child_env(args)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        launch(args, everything, env, procs)
        if (
            wait_ready(procs, ready_urls(args, everything), args.ready_timeout, STATE_DIR / "logs")
            is not None
        ):
            return 1
        prom = next((s for s in svcs if s.name == "prometheus"), None)
        links = prometheus.ui_links(f"http://127.0.0.1:{prom.port}") if prom else {}
        print(banner(args, config, svcs, ui, links), flush=True)
        return supervise(procs)
    except Stop:
        print("\n[stack] stopping", flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # let the shutdown finish
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
