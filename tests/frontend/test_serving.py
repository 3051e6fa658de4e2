"""Serving the web UI in the local stack (infra/local/frontend.py, the launcher's flags): the build
when dist/ is missing or older than a source, the static server and the gateway URL it puts into the page. Fast: a fake
npm and a hand-made dist/, no stack."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from infra.local import frontend
from infra.local import stack as launcher
from tests.helpers.procs import REPO_ROOT, free_port, start_process, stop_process

pytestmark = pytest.mark.processes  # the UI's static server, as a process

FAKE_NPM = """#!/bin/sh
echo "$@" >> calls.txt
[ "$1" = "ci" ] && mkdir -p node_modules
if [ "$1" = "run" ]; then
  [ -n "$FAIL" ] && { echo "vite: something broke"; exit 3; }
  mkdir -p dist && echo '<html>built</html>' > dist/index.html
fi
"""


def fake_npm(tmp_path: Path) -> str:
    npm = tmp_path / "npm"
    npm.write_text(FAKE_NPM)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return str(npm)


def test_build_runs_npm_ci_then_build_only_when_missing(tmp_path: Path) -> None:
    ui = tmp_path / "frontend"
    ui.mkdir()
    npm = fake_npm(tmp_path)
    assert frontend.build_if_stale(ui, npm) is None
    assert (ui / "calls.txt").read_text().splitlines() == ["ci --no-audit --no-fund", "run build"]
    assert frontend.build_if_stale(ui, npm) is None  # built: nothing to do
    assert len((ui / "calls.txt").read_text().splitlines()) == 2


def test_a_source_newer_than_the_build_rebuilds_it(tmp_path: Path) -> None:
    ui = tmp_path / "frontend"
    (ui / "src").mkdir(parents=True)
    (ui / "src" / "App.tsx").write_text("old")
    npm = fake_npm(tmp_path)
    assert frontend.build_if_stale(ui, npm) is None
    built = (ui / "dist" / "index.html").stat().st_mtime
    os.utime(ui / "src" / "App.tsx", (built + 10, built + 10))  # edited after the build
    assert frontend.build_if_stale(ui, npm) is None
    assert (ui / "calls.txt").read_text().splitlines() == [
        "ci --no-audit --no-fund",
        "run build",
        "run build",
    ]  # no second ci


def test_build_skips_npm_ci_with_node_modules_and_reports_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ui = tmp_path / "frontend"
    (ui / "node_modules").mkdir(parents=True)
    monkeypatch.setenv("FAIL", "1")
    why = frontend.build_if_stale(ui, fake_npm(tmp_path))
    assert why is not None and "`npm run build` failed (exit 3)" in why and "vite: something broke" in why
    assert (ui / "calls.txt").read_text().splitlines() == ["run build"]


def test_build_without_npm_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    why = frontend.build_if_stale(tmp_path)
    assert why is not None and "npm is not installed" in why


def test_server_fills_in_the_gateway_url_and_serves_assets(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    page = f"<html><head>{frontend.GATEWAY_META}</head><body>ui</body></html>"
    (dist / "index.html").write_text(page)
    (dist / "assets" / "app.js").write_text("console.log(1)")
    port = free_port()
    args = [sys.executable, "-m", "infra.local.frontend", "--port", str(port), "--dir", str(dist)]
    h = start_process([*args, "--gateway-url", 'http://gw:8000/"x'], f"http://127.0.0.1:{port}/")
    try:
        for path in ("/", "/index.html?gateway=elsewhere"):
            r = httpx.get(f"http://127.0.0.1:{port}{path}")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert '<meta name="tandem-gateway-url" content="http://gw:8000/&quot;x" />' in r.text
        js = httpx.get(f"http://127.0.0.1:{port}/assets/app.js")
        assert js.status_code == 200 and js.text == "console.log(1)"
        assert js.headers["x-content-type-options"] == "nosniff"
        assert httpx.get(f"http://127.0.0.1:{port}/nope.js").status_code == 404
    finally:
        stop_process(h)


def test_server_refuses_a_missing_build(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "infra.local.frontend", "--port", "0", "--dir", str(tmp_path)]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "has no index.html" in done.stderr


def test_the_built_page_carries_the_meta_tag() -> None:
    """The source index.html keeps the exact tag the server fills in."""
    assert frontend.GATEWAY_META in (frontend.FRONTEND_DIR / "index.html").read_text()


def test_launcher_flags() -> None:
    args = launcher.parse(["up"], {})
    assert args.no_frontend is False and args.frontend_port == 5173
    assert launcher.parse(["up", "--no-frontend"], {}).no_frontend is True
    off = launcher.parse(["up"], {"TANDEM_NO_FRONTEND": "1", "TANDEM_FRONTEND_PORT": "6000"})
    assert off.no_frontend is True and off.frontend_port == 6000
    assert launcher.frontend_service(off) is None
    assert frontend.cors_origins(6000) == "http://127.0.0.1:6000,http://localhost:6000"


def test_banner_names_the_ui_when_served(tmp_path: Path) -> None:
    args = launcher.parse(["up", "--frontend-port", "5999"], {})
    config = launcher.gateway_config(args, "gpt2", ["s1", "s2", "s3"])
    svcs = launcher.services(args, config, tmp_path / "c.json")
    ui = launcher.Service("frontend", 5999, [], "/")
    assert "web UI        http://127.0.0.1:5999/" in launcher.banner(args, config, svcs, ui)
    assert "web UI" not in launcher.banner(args, config, svcs)
    assert "3 stage processes" in launcher.banner(args, config, svcs, ui)
