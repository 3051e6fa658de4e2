"""A real Prometheus for tests, and the PromQL the repository ships (dashboard panels, rules).

The server loads a copy of observability/prometheus/prometheus.local.yml that differs only in its
two global intervals (1 s instead of 15 s, so a test sees scrapes and rule evaluations in
seconds); targets come from the launcher's own code (infra/local/prometheus.py) with the test's
ports, and the rules folder is linked, not copied.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from infra.local import prometheus as local_prometheus
from tests.helpers.procs import REPO_ROOT, ProcessHandle, free_port, start_process, stop_process

DASHBOARD = REPO_ROOT / "observability" / "grafana" / "dashboards" / "tandem.json"
RULES_DIR = local_prometheus.RULES_DIR
# Grafana's variables, as the test resolves them (a 1 s scrape interval: 1m holds plenty of samples)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m"}
# the trailing `<op> <number>` of an alert expression
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*-?[0-9.]+(e-?[0-9]+)?\s*$")


def fast_config(folder: Path, interval: str = "1s") -> Path:
    """prometheus.local.yml with `interval` as its scrape and evaluation interval, nothing else changed."""
    text = local_prometheus.LOCAL_CONFIG.read_text()
    fast, n = re.subn(r"^(  (?:scrape|evaluation)_interval:) 15s$", rf"\1 {interval}", text, flags=re.M)
    assert n == 2, "prometheus.local.yml no longer has both global 15s intervals"
    original, changed = yaml.safe_load(text), yaml.safe_load(fast)
    original["global"] = changed["global"]
    assert original == changed, "only the intervals may differ"
    path = folder / "prometheus.fast.yml"
    path.write_text(fast)
    return path


@dataclass
class PrometheusServer:
    url: str
    handle: ProcessHandle

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query's whole answer (status, data or error)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        answer: dict[str, Any] = r.json()
        return answer

    def targets(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10)
        active: list[dict[str, Any]] = r.json()["data"]["activeTargets"]
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"][
            "groups"
        ]
        return groups

    def stop(self) -> None:
        stop_process(self.handle)


def start_prometheus(folder: Path, targets: dict[str, Any]) -> PrometheusServer:
    binary = shutil.which("prometheus")
    assert binary is not None, "no prometheus binary"
    config = local_prometheus.prepare(folder / "prometheus", targets, config=fast_config(folder))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    handle = start_process(local_prometheus.command(binary, config, port), f"{url}/-/ready", timeout=60)
    return PrometheusServer(url, handle)


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel (those in collapsed rows included)."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for p in dashboard["panels"]:
        out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
        out += dashboard_queries({"panels": p.get("panels", [])})
    return out


def rule_queries() -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in observability/prometheus/rules."""
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("alert") or rule["record"], rule["expr"].strip()))
    return out


def without_threshold(expr: str) -> str:
    """An alert's figure: its expression without the trailing comparison with a number."""
    return THRESHOLD.sub("", expr)


def resolve(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced (GRAFANA_VARIABLES)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unresolved Grafana variable in {expr}"
    return expr


def has_number(answer: dict[str, Any]) -> bool:
    """An instant-query answer with at least one sample whose value is a number (not NaN)."""
    if answer.get("status") != "success":
        return False
    data = answer["data"]
    samples = data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]
    return any(not math.isnan(float(s["value"][1])) for s in samples)


__all__ = [
    "PrometheusServer",
    "dashboard_queries",
    "has_number",
    "resolve",
    "rule_queries",
    "start_prometheus",
    "without_threshold",
]
