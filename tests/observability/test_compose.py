"""docker-compose.monitoring.yml: valid against the Compose specification's schema
(check-jsonschema's vendored copy, no network), and wired as docs/monitoring.md says: on its own (the
original's `docker-compose -f docker-compose.monitoring.yml up -d`), Prometheus on :9090 with the
committed configuration scraping every service and replica of docker-compose.yml, Grafana on :3000
with admin/admin and the dashboard provisioned, Jaeger with its OTLP receiver on, and every service
of docker-compose.yml exporting OTLP to it."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.helpers.procs import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.monitoring.yml"
STACK = REPO_ROOT / "docker-compose.yml"


def test_matches_the_compose_schema() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_file_is_refused(tmp_path) -> None:  # the check can fail
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  prometheus:\n    ports: 9090\n")
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0


def test_wiring() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert "name" not in doc  # docker-compose 1.29 rejects a top-level name
    svc = doc["services"]
    prom = svc["prometheus"]
    assert "9090:9090" in prom["ports"]
    assert "./observability/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert (REPO_ROOT / "observability" / "prometheus" / "prometheus.yml").is_file()
    grafana = svc["grafana"]
    assert "3000:3000" in grafana["ports"]
    env = grafana["environment"]
    assert (env["GF_SECURITY_ADMIN_USER"], env["GF_SECURITY_ADMIN_PASSWORD"]) == ("admin", "admin")
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].rsplit("/", 1)[1]
    assert (REPO_ROOT / "observability" / "grafana" / "dashboards" / home).is_file()
    for volume in grafana["volumes"] + prom["volumes"]:
        source = volume.split(":")[0]
        assert not source.startswith("./") or (REPO_ROOT / source).exists(), volume
    jaeger = svc["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])
    assert set(svc) == {"prometheus", "grafana", "jaeger"}  # nothing of the stack's: it runs on its own
    stack = yaml.safe_load(STACK.read_text())["services"]
    serving = {name for name, s in stack.items() if name not in ("export", "frontend")}
    assert {"gateway", "tokenizer", "stage-1", "stage-2", "stage-2-b", "stage-3"} <= serving
    for name in serving:  # the variables functions/telemetry.py reads
        endpoint = stack[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint.endswith("http://jaeger:4318}"), endpoint
    targets = yaml.safe_load((REPO_ROOT / "observability" / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        t.split(":")[0]: int(t.split(":")[1])
        for job in targets["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    }
    assert set(scraped) == serving  # every replica
    for name, port in scraped.items():
        assert stack[name]["environment"]["PORT"] == str(port), name
