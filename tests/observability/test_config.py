"""The Prometheus configuration as promtool sees it (check config, check rules, the rule unit
tests), the launcher's target lists, and that every alert has a unit test that makes it fire."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.local import prometheus as local_prometheus
from tests.helpers.procs import REPO_ROOT
from tests.helpers.prometheus import RULES_DIR, fast_config, rule_queries

PROM_DIR = REPO_ROOT / "observability" / "prometheus"
RULE_TESTS = PROM_DIR / "tests" / "rules_test.yml"
STAGES = ["stage-1", "stage-2", "stage-3"]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip(
            "promtool not installed: Debian package prometheus (`make test` installs it as root; "
            "else sudo apt-get install --no-install-recommends prometheus)"
        )
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def two_replica_config() -> dict:
    nodes = [
        {"id": f"{name}-r{r}", "address": f"127.0.0.1:{8101 + 2 * k + r}", "model_part": k}
        for k, name in enumerate(STAGES)
        for r in range(2)
    ]
    return {"model_name": "gpt2", "tokenizer": {"address": "127.0.0.1:8100"}, "nodes": nodes}


def test_compose_config_is_valid() -> None:
    r = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout + r.stderr  # the rules folder resolved beside it
    jobs = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["gateway", "tokenizer", "stages"]


def test_local_config_as_the_launcher_lays_it_out_is_valid(tmp_path: Path) -> None:
    """The launcher's folder (links to the committed config and rules, target lists for two
    replicas per stage) passes promtool with no warning: every file it names exists."""
    targets = local_prometheus.scrape_targets(
        two_replica_config(), STAGES, "127.0.0.1:8000", "127.0.0.1:8100"
    )
    config = local_prometheus.prepare(tmp_path, targets)
    assert config.resolve() == local_prometheus.LOCAL_CONFIG  # the committed file, not a copy
    r = promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    stages = yaml.safe_load((tmp_path / "targets" / "stages.json").read_text())
    assert [(t["targets"], t["labels"]) for t in stages[:3]] == [
        (["127.0.0.1:8101"], {"stage": "stage-1", "replica": "stage-1-r0"}),
        (["127.0.0.1:8102"], {"stage": "stage-1", "replica": "stage-1-r1"}),
        (["127.0.0.1:8103"], {"stage": "stage-2", "replica": "stage-2-r0"}),
    ]
    assert len(stages) == 6


def test_launcher_plan_honours_the_flag_and_a_missing_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(no_prometheus=True, prometheus_port=9999, gateway_port=8000)
    assert local_prometheus.plan(args, two_replica_config(), STAGES, tmp_path) is None
    args.no_prometheus = False
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus on it
    assert local_prometheus.plan(args, two_replica_config(), STAGES, tmp_path) is None
    assert "Prometheus is not installed" in capsys.readouterr().out


def test_fast_copy_changes_only_the_intervals(tmp_path: Path) -> None:
    fast = yaml.safe_load(fast_config(tmp_path).read_text())
    assert fast["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}


def test_rules_are_valid() -> None:
    r = promtool("check", "rules", *map(str, sorted(RULES_DIR.glob("*.yml"))))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr


def test_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_fires_in_a_unit_test() -> None:
    alerts = {name for name, _ in rule_queries() if not name.startswith("tandem:")}
    assert len(alerts) == 8
    fired = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
    assert fired == alerts
