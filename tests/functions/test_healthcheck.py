"""`python -m functions.healthcheck PATH` (the images' HEALTHCHECK) against a real HTTP server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from tests.helpers.procs import REPO_ROOT, free_port
from tests.helpers.static_server import serve_directory


def healthcheck(path: str, port: str | None) -> subprocess.CompletedProcess[str]:
    env = {} if port is None else {"PORT": port}
    return subprocess.run(
        [sys.executable, "-m", "functions.healthcheck", path],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthy_only_on_200(tmp_path: Path) -> None:
    (tmp_path / "ready").write_text("ok")
    with serve_directory(tmp_path) as (url, requested):
        port = str(urlsplit(url).port)
        assert healthcheck("/ready", port).returncode == 0
        r = healthcheck("/not-ready", port)
        assert r.returncode == 1 and "answered 404" in r.stderr
    assert requested == ["/ready", "/not-ready"]


def test_nothing_listening_or_no_port() -> None:
    r = healthcheck("/readyz", str(free_port()))
    assert r.returncode == 1 and "healthcheck:" in r.stderr
    r = healthcheck("/readyz", None)
    assert r.returncode == 2 and "PORT must be set" in r.stderr
    assert healthcheck("readyz", "8000").returncode == 2
