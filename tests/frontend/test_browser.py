"""The web UI end to end: `python -m infra.local.stack up` (what `make up` runs) serves the built UI
next to the real stack on the tiny random bundle made a chat model (tests/helpers/chat.py), with
client API keys required (TANDEM_API_KEYS: the page gets the key from its Settings) and traces
exported to a test OTLP receiver; Debian's Chromium, driven by frontend/e2e/drive.mjs
(playwright-core), uses the page as a person would: a completion, Stop, a refused parameter, a
three-turn chat and Stop in the chat. Screenshots (desktop, chat, narrow, the error) land in this
test's tmp directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functions import contract
from infra.local import frontend
from tests.helpers.otlp import OtlpReceiver
from tests.helpers.procs import REPO_ROOT, port_run, read_until

pytestmark = [pytest.mark.browser, pytest.mark.processes]

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = frontend.FRONTEND_DIR / "e2e" / "drive.mjs"
API_KEY = "sk-browser-test-0123456789abcdef"


@pytest.fixture(scope="module")
def built_ui() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed (`make test` installs it as root; "
            "else sudo apt-get install --no-install-recommends chromium)"
        )
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node 20 with npm is needed to build and drive the UI")
    why = frontend.build_if_stale()
    assert why is None, why
    return frontend.DIST


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def launched(
    chat_bundle: Path, built_ui: Path, otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    gw, tok, ui, prom, base = port_run(7)[:5]  # the stages take base, base + 1, base + 2
    state = tmp_path_factory.mktemp("ui-stack")
    args = [
        "--bundle",
        str(chat_bundle),
        "--no-export",
        "--gateway-port",
        str(gw),
        "--tokenizer-port",
        str(tok),
    ]
    args += ["--stage-port-base", str(base), "--frontend-port", str(ui), "--threads", "1"]
    args += ["--prometheus-port", str(prom)]  # not 9090: another stack may hold it
    env = {**os.environ, "TANDEM_STATE_DIR": str(state), "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint}
    env["TANDEM_API_KEYS"] = API_KEY
    env.pop("TANDEM_CORS_ORIGINS", None)  # the launcher's default: the UI's own origins
    p = subprocess.Popen(
        [sys.executable, "-m", "infra.local.stack", "up", *args],
        cwd=REPO_ROOT,
        env={**env, "OTEL_BSP_SCHEDULE_DELAY": "200"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        banner = read_until(p.stdout, lambda line: "/docs" in line, 120)
        assert "/docs" in banner, banner
        stages = {contract.stage_name(k + 1): f"http://127.0.0.1:{base + k}" for k in range(3)}
        docs = f"http://127.0.0.1:{gw}/docs"
        gateway = f"http://127.0.0.1:{gw}"
        yield {
            "ui": f"http://127.0.0.1:{ui}/",
            "banner": banner,
            "stages": stages,
            "docs": docs,
            "gateway": gateway,
        }
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


@pytest.fixture(scope="module")
def seen(launched: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the browser saw, once for every test below (one browser run covers them all)."""
    out = tmp_path_factory.mktemp("browser")
    cfg = {
        "ui": launched["ui"],
        "chromium": str(CHROMIUM),
        "out": str(out),
        "stages": launched["stages"],
        "docs": launched["docs"],
        "apiKey": API_KEY,
    }
    done = subprocess.run(
        ["node", str(DRIVER), json.dumps(cfg)],
        cwd=frontend.FRONTEND_DIR,
        capture_output=True,
        text=True,
        timeout=240,
    )
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    why = f"{results.get('failure')}\npage errors: {results.get('pageErrors')}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{why}\nscreens in {out}"
    results["out"] = out
    return results


def test_banner_names_the_web_ui(launched: dict[str, Any]) -> None:
    assert f"web UI        {launched['ui']}" in launched["banner"]


def test_every_control_is_labelled(seen: dict[str, Any]) -> None:
    assert seen["unlabelled"] == []
    assert seen["pageErrors"] == []


def test_node_health_for_every_stage(seen: dict[str, Any], launched: dict[str, Any]) -> None:
    assert list(seen["nodes"]) == list(launched["stages"])
    for name, text in seen["nodes"].items():
        assert re.search(r"\bup\b", text) and "KV cache:" in text, (name, text)


def test_tokens_stream_in_and_metrics_fill(seen: dict[str, Any]) -> None:
    g = seen["generation"]
    assert g["status"].startswith("Finished (length) after 48 tokens")
    assert g["metrics"]["generated"] == "48" and int(g["metrics"]["prompt"]) > 0
    for key in ("ttft", "total"):
        assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", g["metrics"][key]), g["metrics"]
    assert float(g["metrics"]["rate"]) > 0
    # the text grew on screen step by step, not all at once at the end
    growth = sorted(set(g["lengths"]))
    assert len(growth) >= 10 and growth[-1] == len(g["output"]), growth
    for name, shown in g["stageTimes"].items():
        assert re.search(r"\d+(\.\d+)? (ms|s)$", shown), (name, shown)
    assert g["chart"].startswith("Inter-token latency over 47 gaps")
    assert all(t.startswith("KV cache: 0 sequences") for t in g["kvShown"]), g["kvShown"]  # freed at the end


def test_trace_link_points_at_the_request_trace(seen: dict[str, Any], otlp: OtlpReceiver) -> None:
    link = seen["generation"]["traceLink"]
    assert link is not None and link.startswith("http://localhost:16686/trace/")
    trace_id = link.rsplit("/", 1)[1]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    spans = otlp.wait_for(lambda s: any(x.service == "gateway" for x in s), trace_id=trace_id, timeout=10)
    assert any(x.service == "gateway" and "/v1/completions" in x.name for x in spans)
    # the node panel's polling (every 2 s) opens no traces of its own
    polled = [x.name for x in otlp.spans() if "/api/nodes" in x.name]
    assert polled == []


def test_stop_frees_the_kv_cache_in_every_stage(seen: dict[str, Any], launched: dict[str, Any]) -> None:
    s = seen["stop"]
    assert s["heldDuring"] == dict.fromkeys(launched["stages"], 1), s  # generating when stopped
    assert s["status"].startswith("Stopped after") and 10 <= s["generated"] < 1000, s
    assert s["heldAfter"] == dict.fromkeys(launched["stages"], 0), s
    assert len(s["kvShown"]) == 3 and all(t.startswith("KV cache: 0 sequences") for t in s["kvShown"]), s


def test_refused_parameter_shows_the_gateways_reason(seen: dict[str, Any]) -> None:
    assert seen["refused"].startswith("The gateway refused the request (400): temperature must be")
    assert "(parameter: temperature)" in seen["refused"]


def test_narrow_screen_and_keyboard(seen: dict[str, Any]) -> None:
    n = seen["narrow"]
    assert n["focused"] == ["tab-completion", "prompt"]  # one tab stop for the view tabs, then the text
    assert n["overflowPx"] <= 0  # nothing wider than the phone's screen
    assert n["output"]  # Ctrl+Enter ran it
    for shot in ("desktop.png", "narrow.png", "desktop-error.png", "chat.png"):
        assert (seen["out"] / shot).stat().st_size > 10_000, shot


def test_api_docs_render_from_the_gateway_alone(seen: dict[str, Any]) -> None:
    """Swagger UI in Chromium lists the gateway's operations; nothing came from another origin."""
    assert "/v1/completions" in seen["docs"]["paths"], seen["docs"]
    assert seen["docs"]["foreign"] == []


def test_chat_streams_three_turns_each_with_its_metrics(
    seen: dict[str, Any], launched: dict[str, Any]
) -> None:
    c = seen["chat"]
    assert [t["message"] for t in c["turns"]] == ["Hello there", "Tell me more", "And then?"]
    prompts = []
    for t in c["turns"]:
        assert t["status"].startswith("Finished (length) after 24 tokens"), t
        assert t["metrics"]["generated"] == "24", t
        prompts.append(int(t["metrics"]["prompt"]))
        assert float(t["metrics"]["rate"]) > 0 and re.fullmatch(
            r"\d+(\.\d+)? (ms|s)", t["metrics"]["ttft"]
        ), t
        assert set(t["stageTimes"]) == set(launched["stages"]), t
        growth = sorted(set(t["lengths"]))  # the answer grew on screen step by step
        assert len(growth) >= 5 and growth[-1] == len(t["answer"]) > 0, t
    assert prompts[0] < prompts[1] < prompts[2]  # each turn sends the conversation so far
    shown = c["shown"]
    assert len(shown) == 6 and [s.split("\n")[0] for s in shown] == ["You", "Model"] * 3, shown
    assert [s.split("\n", 1)[1].strip() for s in shown[::2]] == ["Hello there", "Tell me more", "And then?"]


def test_chat_stop_frees_the_sequence_in_every_stage(seen: dict[str, Any], launched: dict[str, Any]) -> None:
    s = seen["chatStop"]
    assert s["heldDuring"] == dict.fromkeys(launched["stages"], 1), s
    assert s["status"].startswith("Stopped after") and 10 <= s["generated"] < 700, s
    assert s["heldAfter"] == dict.fromkeys(launched["stages"], 0), s
    assert all(t.startswith("KV cache: 0 sequences") for t in s["kvShown"]), s
    assert s["last"].endswith("stopped"), s


def test_chat_requests_are_traced_as_chat(seen: dict[str, Any], otlp: OtlpReceiver) -> None:
    link = seen["chat"]["turns"][-1]["traceLink"]
    assert link is not None
    trace_id = link.rsplit("/", 1)[1]
    spans = otlp.wait_for(lambda s: any(x.service == "gateway" for x in s), trace_id=trace_id, timeout=10)
    (root,) = [x for x in spans if x.service == "gateway" and x.parent_span_id is None]
    assert "/v1/chat/completions" in root.name
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.usage.output_tokens"] == 24


def test_the_page_sent_the_api_key_the_gateway_wants(seen: dict[str, Any], launched: dict[str, Any]) -> None:
    import httpx

    assert seen["nodes"]  # the page read the node health, so it sent the key ...
    r = httpx.get(f"{launched['gateway']}/api/nodes", timeout=5)
    assert r.status_code == 401, r.text  # ... which this gateway wants
    ok = httpx.get(
        f"{launched['gateway']}/api/nodes", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    assert ok.status_code == 200 and ok.json()["tracing"] is True
