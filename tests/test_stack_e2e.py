"""The one-command local stack, for real: `python -m infra.local.stack up` starts every service as
its own process, serves, and stops them all on SIGTERM; without the hub it stops with the
offline hint instead of falling back to random weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from functions import contract as c
from tests.helpers.procs import REPO_ROOT, port_run, read_until

pytestmark = pytest.mark.processes


def _launcher(args: list[str], state: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "infra.local.stack", *args],
        cwd=REPO_ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TANDEM_STATE_DIR": str(state), **env},
    )


ALL_CPUS = os.sched_getaffinity(0)
LOOP_CPU = min(ALL_CPUS)


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """The CPUs each thread of `pid` may run on, from /proc."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus: set[int] = set()
                for part in line.split(":", 1)[1].strip().split(","):
                    lo, _, hi = part.partition("-")
                    cpus.update(range(int(lo), int(hi or lo) + 1))
                out[int(task.name)] = cpus
    return out


def check_prometheus(out: str, port: int) -> None:
    """The launcher's Prometheus is up on 127.0.0.1:`port` with one target per process (or, where
    the binary is missing, the launcher said so and the stack ran without it)."""
    if shutil.which("prometheus") is None:
        assert "Prometheus is not installed" in out, out
        return
    url = f"http://127.0.0.1:{port}"
    line = next((x for x in out.splitlines() if x.startswith(f"  prometheus    {url}")), None)
    assert line is not None, out
    assert httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    # the targets and alerts pages it prints are the ones this Prometheus serves (Debian's: /classic/)
    pages = dict(re.findall(r"(targets|alerts) (http://\S+?)[,)]", line))
    assert set(pages) == {"targets", "alerts"}, line
    for page, link in pages.items():
        assert httpx.get(link, timeout=5).status_code == 200, (page, link)
    deadline = time.monotonic() + 20  # file_sd targets reach the scrape manager within ~5 s
    while True:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        if len(targets) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    jobs = sorted((t["labels"]["job"], t["labels"].get("stage", "")) for t in targets)
    assert jobs == [
        ("gateway", ""),
        ("stages", "stage-1"),
        ("stages", "stage-2"),
        ("stages", "stage-3"),
        ("tokenizer", ""),
    ], targets


def test_up_serves_and_stops_everything(tiny_bundle: Path, tmp_path: Path) -> None:
    # below the ephemeral range: a free_port() base + 1 can be some connection's source port
    gw, tok, prom, base = port_run(6)[:4]  # the stages take base, base + 1, base + 2
    p = _launcher(
        [
            "up",
            "--bundle",
            str(tiny_bundle),
            "--no-export",
            "--no-frontend",  # the web UI's serving is tested in tests/frontend
            "--gateway-port",
            str(gw),
            "--tokenizer-port",
            str(tok),
            "--stage-port-base",
            str(base),
            "--threads",
            "2",
            "--loop-cpu",
            str(LOOP_CPU),
            "--auth",
            "--prometheus-port",
            str(prom),
        ],
        tmp_path,
    )
    last_line = "  prometheus " if shutil.which("prometheus") else "  OpenAPI docs"
    out = ""
    try:
        # the URL block is printed once everything is ready
        out = read_until(p.stdout, lambda line: line.startswith(last_line), 90)
        assert f"http://127.0.0.1:{gw}" in out, out
        assert httpx.get(f"http://127.0.0.1:{gw}/readyz").status_code == 200
        r = httpx.post(
            f"http://127.0.0.1:{gw}/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        # --auth: the functions want the generated service token, which the gateway sends
        token = (tmp_path / "auth-token").read_text().strip()
        assert len(token) >= 32 and token not in out
        assert oct((tmp_path / "auth-token").stat().st_mode & 0o777) == "0o600"
        sequences = f"http://127.0.0.1:{base}/v2/models/{c.stage_name(1)}/sequences"
        refused = httpx.get(sequences)
        assert refused.status_code == 401 and "TANDEM_AUTH_TOKEN" in refused.json()["detail"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(sequences, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{base}/metrics").status_code == 200  # scrapers carry no token
        # loopback stack: a page elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) is refused
        rebound = httpx.post(
            f"http://127.0.0.1:{gw}/v1/completions",
            json={"prompt": "hello", "max_tokens": 1},
            headers={"Host": f"evil.example:{gw}"},
        )
        assert rebound.status_code == 400 and "TANDEM_ALLOWED_HOSTS" in rebound.text, rebound.text
        status = subprocess.run(
            [sys.executable, "-m", "infra.local.stack", "status"],
            cwd=REPO_ROOT,
            text=True,
            capture_output=True,
            env={**os.environ, "TANDEM_STATE_DIR": str(tmp_path)},
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"event loops pinned to CPU {LOOP_CPU}" in out
        check_prometheus(out, prom)
        for service in json.loads((tmp_path / "pids.json").read_text())["services"]:
            if service["name"] == "prometheus":
                continue  # not ours to pin
            threads = thread_cpus(service["pid"])
            assert threads[service["pid"]] == {LOOP_CPU}, (service["name"], threads)  # the event loop
            if service["name"].startswith("stage"):  # ONNX Runtime's worker keeps every CPU
                assert ALL_CPUS in threads.values(), (service["name"], threads)
    finally:
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out + rest
    assert "stopped" in rest
    for port in (gw, tok, base, base + 1, base + 2, prom):  # every service is gone
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    assert not (tmp_path / "pids.json").exists()


def test_hub_unreachable_names_the_offline_option(tmp_path: Path) -> None:
    p = _launcher(["up", "--bundle", str(tmp_path / "gpt2")], tmp_path / "state", HF_HUB_OFFLINE="1")
    out, _ = p.communicate(timeout=180)
    assert p.returncode != 0
    assert "RANDOM_INIT=gpt2" in out and "--random-init" in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "gpt2").exists()  # nothing exported, no silent fallback
