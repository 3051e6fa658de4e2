"""What the launcher starts: the gateway's config (one node per stage replica), one Service per
process with its command line, and the banner printed once everything is ready. Stdlib and
functions.bundle (stdlib) only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functions.bundle import short_name
from infra.local import frontend
from infra.local.procs import REPO_ROOT, shown

# logs, pid file and generated config; TANDEM_STATE_DIR moves them (tests use a temp dir)
STATE_DIR = Path(os.environ.get("TANDEM_STATE_DIR") or REPO_ROOT / ".tandem" / "stack")


@dataclass
class Service:
    name: str
    port: int
    args: list[str]  # completed with --port and --host by services()
    ready_path: str = "/v2/health/ready"


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
    if (why := frontend.build_if_stale()) is not None:
        print(f"[stack] no web UI: {why}; --no-frontend skips it", file=sys.stderr, flush=True)
        return None
    gw = ["--gateway-url", f"http://{client_host(args.host)}:{args.gateway_port}"]
    cmd = [sys.executable, "-m", "infra.local.frontend", *gw, "--port", str(args.frontend_port)]
    return Service("frontend", args.frontend_port, [*cmd, "--host", args.host], "/")


def banner(
    args: argparse.Namespace,
    config: dict[str, Any],
    svcs: list[Service],
    ui: Service | None = None,
    prom_links: Mapping[str, str] | None = None,
) -> str:
    """What the launcher prints once everything is ready; `prom_links`: Prometheus's pages that
    answered (prometheus.ui_links)."""
    h = client_host(args.host)
    gw = f"http://{h}:{args.gateway_port}"
    metrics = "\n".join(f"    {s.name:<12} http://{h}:{s.port}/metrics" for s in svcs)
    body = json.dumps({"model": config["model_name"], "prompt": "Hello, my name is", "max_tokens": 20})
    pages = ", ".join(f"{page} {url}" for page, url in (prom_links or {}).items())
    prom = "".join(
        f"  prometheus    http://127.0.0.1:{s.port}" + (f"  ({pages})" if pages else "") + "\n"
        for s in svcs
        if s.name == "prometheus"
    )
    return (
        f"\ntandem is up: {config['model_name']}, {len(config['nodes'])} stage processes. Ctrl-C stops everything.\n"
        + (f"  web UI        http://{h}:{ui.port}/\n" if ui else "")
        + f"  gateway API   {gw}/v1/completions  (OpenAI-compatible), {gw}/api/model/process\n"
        f"  chat          {gw}/v1/chat/completions  (OpenAI-compatible, the model's chat template)\n"
        f"  models        {gw}/v1/models\n  OpenAPI docs  {gw}/docs\n  metrics\n{metrics}\n{prom}"
        f"  logs          {shown(STATE_DIR / 'logs')}/\n  try\n"
        f"    curl -s {gw}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n"
    )
