"""The Grafana dashboard and provisioning, structurally: the committed JSON is what
observability/grafana/dashboard.py builds, panels and targets are well formed, every data source
reference resolves to a provisioned data source, ids are unique. That every panel query returns
data from a real Prometheus is test_prometheus_live.py's job: it runs dashboard_queries(), which
this file checks covers every target of every panel."""

from __future__ import annotations

import json
from typing import Any

import yaml

from observability.grafana import dashboard as builder
from tests.helpers.procs import REPO_ROOT
from tests.helpers.prometheus import DASHBOARD, dashboard_queries

GRAFANA = REPO_ROOT / "observability" / "grafana"
ORIGINAL_PANELS = {
    "API request latency",
    "Model inference latency by node",
    "Tokenizer operations",
    "Memory usage",
    "Request success/error rates",
    "Token counts",
    "Node health status",
}
PIPELINE_PANELS = {
    "Time to first token",
    "Inter-token latency",
    "Tokens per second",
    "Running and waiting sequences",
    "Batch size per step",
    "Stage call latency by stage and replica",
    "KV cache bytes",
    "KV cache sequences",
    "Replays, failovers and evictions",
}
PANEL_TYPES = {"row", "timeseries", "stat"}


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


def datasources() -> dict[str, str]:
    """uid -> type of every provisioned data source."""
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text())
    return {d["uid"]: d["type"] for d in doc["datasources"]}


def test_committed_json_is_what_the_builder_makes() -> None:
    assert DASHBOARD.read_text() == builder.render(), "run: python -m observability.grafana.dashboard"


def test_dashboard_structure() -> None:
    d = load()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    panels = all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    sources = datasources()
    titles = set()
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert p["title"], p
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        covered = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not covered & cells, f"{p['title']} overlaps another panel"
        cells |= covered
        if p["type"] == "row":
            continue
        titles.add(p["title"])
        assert p["description"], p["title"]
        ds = p["datasource"]
        assert sources.get(ds["uid"]) == ds["type"], (p["title"], ds, sources)
        targets = p["targets"]
        assert targets, f"{p['title']} has no query"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert sources.get(t["datasource"]["uid"]) == t["datasource"]["type"] == "prometheus"
            assert t["expr"].strip() and "legendFormat" in t
    assert ORIGINAL_PANELS <= titles, ORIGINAL_PANELS - titles
    assert PIPELINE_PANELS <= titles, PIPELINE_PANELS - titles
    assert len(titles) == len([p for p in panels if p["type"] != "row"]), "panel titles must be unique"


def test_live_test_covers_every_panel_query() -> None:
    d = load()
    every = [(p["title"], t["expr"]) for p in all_panels(d["panels"]) for t in p.get("targets", [])]
    assert sorted(dashboard_queries(d)) == sorted(every)
    assert len(every) >= 30


def test_provisioning_points_at_the_dashboards_folder() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    [provider] = doc["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.monitoring.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./observability/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./observability/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert set(datasources()) == {"prometheus", "jaeger"}
    jaeger_links = [link for link in load()["links"] if "jaeger" in link["url"]]
    assert jaeger_links, "the dashboard links to the traces"
