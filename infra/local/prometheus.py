"""A real Prometheus for the local stack, on 127.0.0.1, scraping every process the launcher starts.

It loads observability/prometheus/prometheus.local.yml itself, not a copy: the launcher makes a
folder (STATE_DIR/prometheus) holding links to that file and to the rules folder, plus the
file_sd target lists (targets/<job>.json) for the ports and replicas of this run; Prometheus reads
relative paths from the folder of the config path it is given, so the links and lists meet there.
Debian's `prometheus` package provides the binary (`make install` installs it where it can).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "observability" / "prometheus"
LOCAL_CONFIG = CONFIG_DIR / "prometheus.local.yml"
RULES_DIR = CONFIG_DIR / "rules"
READY_PATH = "/-/ready"
# the UI's pages: upstream builds serve the React UI at /targets, /alerts; Debian's package (no
# React assets) serves only the classic UI, under /classic/ (its / redirects to /classic/graph)
UI_PAGES = {"targets": ("/targets", "/classic/targets"), "alerts": ("/alerts", "/classic/alerts")}
MISSING = (
    "Prometheus is not installed, so the stack runs without it; `sudo apt-get install "
    "--no-install-recommends prometheus` (Debian/Ubuntu) provides it, --no-prometheus hides this note"
)


@dataclass(frozen=True)
class PrometheusPlan:
    args: list[str]
    port: int


def scrape_targets(
    config: dict[str, Any], stage_names: list[str], gateway: str, tokenizer: str
) -> dict[str, Any]:
    """file_sd target lists per job (gateway, tokenizer, stages) for a gateway `config` (nodes with
    host:port addresses): one entry per stage replica, labelled with its stage and node id as the
    gateway's tandem_stage_up is. `gateway` and `tokenizer` are host:port."""
    stages = [
        {
            "targets": [node["address"]],
            "labels": {"stage": stage_names[node["model_part"]], "replica": node["id"]},
        }
        for node in config["nodes"]
    ]
    return {"gateway": [{"targets": [gateway]}], "tokenizer": [{"targets": [tokenizer]}], "stages": stages}


def prepare(folder: Path, targets: dict[str, Any], config: Path = LOCAL_CONFIG) -> Path:
    """Lay out `folder` for Prometheus (links to `config` and the rules, target lists, a data
    folder) and return the config path to give it."""
    (folder / "targets").mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    for link, target in (("prometheus.yml", config), ("rules", RULES_DIR)):
        path = folder / link
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)
    for job, entries in targets.items():
        (folder / "targets" / f"{job}.json").write_text(json.dumps(entries, indent=2) + "\n")
    return folder / "prometheus.yml"


def command(binary: str, config_path: Path, port: int) -> list[str]:
    """Prometheus bound to 127.0.0.1:`port`, its data beside its config."""
    return [
        binary,
        f"--config.file={config_path}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={config_path.parent / 'data'}",
    ]


def plan(args: Any, config: dict[str, Any], stage_names: list[str], folder: Path) -> PrometheusPlan | None:
    """What the launcher starts (its parsed `args`: no_prometheus, prometheus_port, gateway_port,
    tokenizer_port; `config` the gateway's), or None, with a note when it is not installed."""
    if args.no_prometheus:
        return None
    binary = shutil.which("prometheus")
    if binary is None:
        print(f"[stack] note: {MISSING}", flush=True)
        return None
    host = config["tokenizer"]["address"].rsplit(":", 1)[0]
    targets = scrape_targets(
        config, stage_names, f"{host}:{args.gateway_port}", config["tokenizer"]["address"]
    )
    config_path = prepare(folder, targets)
    port = args.prometheus_port
    return PrometheusPlan(command(binary, config_path, port), port)


def ui_links(base_url: str) -> dict[str, str]:
    """The running Prometheus's targets and alerts pages (page -> URL), whichever UI it serves."""
    links = {}
    with httpx.Client(timeout=2.0) as client:
        for page, paths in UI_PAGES.items():
            for path in paths:
                try:
                    if client.get(base_url + path).status_code == 200:
                        links[page] = base_url + path
                        break
                except httpx.TransportError:
                    break
    return links
