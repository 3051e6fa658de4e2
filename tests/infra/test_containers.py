"""The deployment as a user of the original system runs it, on a real Docker engine: a private
dockerd (host networking only) builds the function, gateway, export and UI images on a Debian
base made here; `docker-compose up` of docker-compose.yml (with the host-network override) on an
empty bundles volume exports the model first (random weights, offline) and then starts every
service; a completion through the containers is token for token PyTorch's; Chromium uses the UI
the frontend container serves, with the API on its origin and no CORS setting; every service and
replica sends traces; docker-compose.monitoring.yml, run on its own, brings up Prometheus (made
here from Debian's, the image Docker Hub would give) scraping every replica; Grafana and Jaeger,
whose images cannot be pulled here, are checked by `docker-compose config` (test_manifests.py).
The stage-2 replica fetches its file from a bundle store serving the volume, as in Kubernetes.
Images run as non-root, the serving ones without torch; the function image stays within its size.
(Over 300 lines: one compose run, the slow part, serves every check, so they share one module.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Reference
from tests.helpers import docker
from tests.helpers.docker import DockerEngine, missing_tools
from tests.helpers.otlp import OtlpReceiver
from tests.helpers.procs import REPO_ROOT, free_port
from tests.helpers.static_server import serve_directory

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

STACK = REPO_ROOT / "docker-compose.yml"
MONITORING = REPO_ROOT / "docker-compose.monitoring.yml"
OVERRIDES = REPO_ROOT / "infra" / "compose"
PROJECT = "tandemtest"
SERVICE_TOKEN = "container-test-service-token-0123456789"
NON_ROOT = "10001"
MODEL = "tiny"  # MODEL and RANDOM_INIT: what `docker-compose up` exports, offline
FETCHING = "stage-2-b"  # fetches its file from the bundle store instead of mounting the volume
FUNCTION_IMAGE_MB = 436  # the function image before this change measured 435 MB on this base
CHROMIUM = Path("/usr/bin/chromium")
# image -> (Dockerfile, target or None)
IMAGES = {
    "tandem-function:latest": ("infra/docker/serve.Dockerfile", "function"),
    "tandem-gateway:latest": ("infra/docker/serve.Dockerfile", "gateway"),
    "tandem-export:latest": ("infra/docker/export.Dockerfile", None),
    "tandem-frontend:latest": ("infra/docker/frontend.Dockerfile", None),
}


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    why = missing_tools()
    if why:
        pytest.skip(why)
    e = DockerEngine()
    try:
        yield e
    finally:
        e.stop()


def timed(what: str, started: float) -> None:
    print(f"[docker] {what} in {time.monotonic() - started:.0f} s", flush=True)


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> dict[str, str]:
    """Every image built once on the local base (the layers stay cached in .tandem/docker)."""
    started = time.monotonic()
    base = docker.ensure_base_image(engine)
    timed(f"base image {base}", started)
    started = time.monotonic()
    docker.export_wheelhouse(engine, base)
    timed("wheels for the images downloaded", started)
    args = {"BASE_IMAGE": base, "PIP_ARGS": "--no-index", "NODE_IMAGE": docker.node_image(engine, base)}
    with serve_directory(REPO_ROOT / "build", port=docker.WHEEL_PORT) as (url, _):
        args["EXPORT_PIP_ARGS"] = docker.wheel_index(url)
        # the UI's build (npm, apt: mostly waiting on the network) beside the others (mostly disk)
        with ThreadPoolExecutor(1) as pool:
            ui = pool.submit(build, engine, "tandem-frontend:latest", args)
            for tag in IMAGES:
                if tag != "tandem-frontend:latest":
                    build(engine, tag, args)
            ui.result()
    docker.prometheus_image(engine, base)
    return {"base": base}


def build(engine: DockerEngine, tag: str, args: dict[str, str]) -> None:
    started = time.monotonic()
    dockerfile, target = IMAGES[tag]
    cmd = ["build", "--network=host", "--file", dockerfile, "--tag", tag]
    cmd += ["--target", target] if target else []
    pip = args["EXPORT_PIP_ARGS"] if "export" in dockerfile else args["PIP_ARGS"]
    for name, value in {**args, "PIP_ARGS": pip}.items():
        if f"ARG {name}" in (REPO_ROOT / dockerfile).read_text():
            cmd += ["--build-arg", f"{name}={value}"]
    engine.run(*cmd, ".", timeout=1200)
    timed(f"built {tag} ({engine.image_size_mb(tag):.0f} MB)", started)


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def merged(engine: DockerEngine, files: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """`docker-compose config` of the files as infra/README.md merges them for host networking."""
    doc: dict[str, Any] = yaml.safe_load(engine.compose(files, PROJECT, "config", env=env).stdout)
    return doc


def stack_file(engine: DockerEngine, otlp: OtlpReceiver, workdir: Path) -> tuple[Path, dict[str, int]]:
    """docker-compose.yml + host-network.yml on free ports (other stacks here may hold 8000-8202),
    without `ports` (Docker refuses them with host networking), the gateway's config.json readdressed
    to match; a bundle store beside it serving the volume, from which stage-2-b fetches its file."""
    env = {"MODEL": MODEL, "RANDOM_INIT": MODEL, "TANDEM_AUTH_TOKEN": SERVICE_TOKEN}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
    doc = merged(engine, [STACK, OVERRIDES / "host-network.yml"], env)
    services = doc["services"]
    ports = {name: free_port() for name in [*services, "bundle-store"]}
    for name, service in services.items():
        service.pop("ports", None)
        service.pop("build", None)
        if name != "export":
            service["environment"]["PORT"] = str(ports[name])
    services["frontend"]["environment"]["TANDEM_GATEWAY_URL"] = f"http://gateway:{ports['gateway']}"
    store = {
        k: v
        for k, v in services["tokenizer"].items()
        if k in ("image", "network_mode", "volumes", "depends_on")
    }
    store_url = f"http://127.0.0.1:{ports['bundle-store']}/{MODEL}"
    store["command"] = ["python", "-m", "http.server", str(ports["bundle-store"]), "--bind", "127.0.0.1"]
    store["command"] += ["--directory", "/bundles"]
    # ready once the export has published the manifest, like the Kubernetes store's readiness probe
    check = f"import urllib.request as u; u.urlopen('{store_url}/manifest.json')"
    store["healthcheck"] = {"test": ["CMD", "python", "-c", check], "interval": "2s", "retries": 3}
    services["bundle-store"] = store
    fetching = services[FETCHING]
    fetching["volumes"] = []
    fetching["tmpfs"] = [f"/bundles:uid={NON_ROOT},gid={NON_ROOT}"]
    fetching["environment"]["TANDEM_BUNDLE_URL"] = store_url
    fetching["environment"]["TANDEM_BUNDLE_WAIT"] = "120"
    config = json.loads((OVERRIDES / "config.json").read_text())
    config["model_name"] = MODEL
    for node in config["nodes"]:
        host = node["address"].split(":")[0]
        node["address"] = f"{host}:{ports[host]}"
    config["tokenizer"] = {"address": f"tokenizer:{ports['tokenizer']}"}  # not on the default 8100 here
    (workdir / "config.json").write_text(json.dumps(config))
    services["gateway"]["volumes"] = [f"{workdir / 'config.json'}:/etc/tandem/config.json:ro"]
    path = workdir / "stack.yml"
    path.write_text(yaml.safe_dump(doc))
    return path, ports


def states(engine: DockerEngine, compose_file: Path) -> dict[str, str]:
    """Service -> its container's health (or, without a health check, its state and exit code)."""
    fmt = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}-{{.State.ExitCode}}{{end}}"
    ids = engine.compose([compose_file], PROJECT, "ps", "--all", "--quiet").stdout.split()
    out = {}
    for line in (engine.run("inspect", "--format", fmt, c).stdout.strip() for c in ids):
        name, state = line.split()
        out[name.lstrip("/").removeprefix(f"{PROJECT}_").rsplit("_", 1)[0]] = state
    return out


def wait_up(engine: DockerEngine, compose_file: Path, services: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    now: dict[str, str] = {}
    while time.monotonic() < deadline:
        now = states(engine, compose_file)
        if now.get("export") not in (None, "running-0", "created-0", "exited-0"):
            break  # the export failed: nothing will start
        if all(now.get(s) == ("exited-0" if s == "export" else "healthy") for s in services):
            return now
        time.sleep(1.0)
    logs = engine.compose([compose_file], PROJECT, "logs", "--tail=40", check=False).stdout
    raise AssertionError(f"not up after {timeout:.0f} s: {now}\n{logs[-6000:]}")


@pytest.fixture(scope="module")
def stack(
    engine: DockerEngine, images: dict[str, str], otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, int]]]:
    path, ports = stack_file(engine, otlp, tmp_path_factory.mktemp("compose"))
    engine.compose([path], PROJECT, "down", "--volumes", "--timeout=5", check=False)  # no bundle left over
    started = time.monotonic()
    try:
        engine.compose([path], PROJECT, "up", "--detach", "--no-build", timeout=600)
        wait_up(engine, path, [s for s in yaml.safe_load(path.read_text())["services"]], timeout=600)
        timed("compose: exported, then every service healthy", started)
        yield path, ports
    finally:
        logs = engine.compose([path], PROJECT, "logs", "--tail=30", check=False).stdout
        engine.compose([path], PROJECT, "down", "--volumes", "--timeout=10", check=False, timeout=120)
        print(f"[docker] last container logs:\n{logs[-4000:]}")


def test_images_run_as_non_root_and_only_the_export_has_torch(
    engine: DockerEngine, images: dict[str, str]
) -> None:
    for tag in IMAGES:
        user = engine.run("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()
        assert user == f"{NON_ROOT}:{NON_ROOT}", tag
    probe = "import importlib.util as u, os; print(os.getuid(), u.find_spec('torch') is None)"
    for tag, torch_free in (
        ("tandem-function:latest", "True"),
        ("tandem-gateway:latest", "True"),
        ("tandem-export:latest", "False"),
    ):
        out = engine.run("run", "--rm", "--network=host", tag, "python", "-c", probe).stdout.split()
        assert out == [NON_ROOT, torch_free], f"{tag}: uid and torch-free check gave {out}"
    size = engine.image_size_mb("tandem-function:latest")
    assert size <= FUNCTION_IMAGE_MB, f"the function image grew to {size:.0f} MB"


def test_compose_exported_the_model_first_then_keeps_it(
    engine: DockerEngine, stack: tuple[Path, dict[str, int]]
) -> None:
    path, _ = stack
    logs = engine.compose([path], PROJECT, "logs", "export").stdout
    assert f"exporting (no bundle at /bundles/{MODEL} yet): python -m export --random-init {MODEL}" in logs, (
        logs[-3000:]
    )
    again = engine.compose([path], PROJECT, "run", "--rm", "--no-deps", "export").stdout
    assert f"keeping the bundle at /bundles/{MODEL} (random-init:{MODEL}, 3 stages)" in again, again


def test_a_replica_fetched_its_file_from_the_bundle_store(
    engine: DockerEngine, stack: tuple[Path, dict[str, int]]
) -> None:
    path, ports = stack
    asked = engine.compose([path], PROJECT, "logs", "bundle-store").stdout
    assert f"GET /{MODEL}/manifest.json" in asked and f"GET /{MODEL}/stage2.onnx" in asked, asked
    assert "stage1.onnx" not in asked and "stage3.onnx" not in asked  # only its own file
    auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    r = httpx.get(f"http://127.0.0.1:{ports[FETCHING]}/v2/models/stage-2", headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "stage-2"


def test_compose_stack_serves_a_completion(
    engine: DockerEngine, stack: tuple[Path, dict[str, int]], reference: Reference
) -> None:
    path, ports = stack
    running = engine.run(
        "ps", "--quiet", "--filter", f"label=com.docker.compose.project={PROJECT}"
    ).stdout.split()
    assert len(running) == 8  # the tokenizer, 4 stage replicas, the gateway, the UI, the bundle store
    for c in running:  # the processes themselves, not only the images
        assert engine.run("exec", c, "id", "-u").stdout.strip() == NON_ROOT
    prompt = "Hello, how are you?"
    tokenizer = f"http://127.0.0.1:{ports['tokenizer']}/v1/encode"
    refused = httpx.post(tokenizer, json={"text": prompt})  # the service token is on (functions.auth)
    assert refused.status_code == 401 and "TANDEM_AUTH_TOKEN" in refused.json()["detail"], refused.text
    ids = httpx.post(
        tokenizer, json={"text": prompt}, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}
    ).json()["ids"]
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    r = httpx.post(
        f"{gateway}/api/model/process",
        json={"text": prompt, "metadata": {"max_tokens": 8, "ignore_eos": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == reference.greedy(ids, 8)  # the export in the container == PyTorch
    r = httpx.post(
        f"{gateway}/v1/completions", json={"prompt": prompt, "max_tokens": 5, "model": MODEL}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
    # a --random-init bundle carries tandem's default chat template (export/chat_templates), so the
    # chat route answers on the offline default too
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "model": MODEL}
    r = httpx.post(f"{gateway}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
    want = httpx.post(
        tokenizer,
        json={
            "text": f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
            "add_special_tokens": False,
        },
        headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
    ).json()["ids"]
    assert r.json()["usage"]["prompt_tokens"] == len(want), (r.text, want)


def test_the_ui_container_serves_the_page_and_the_api_on_one_origin(
    stack: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    if not CHROMIUM.exists() or shutil.which("node") is None:
        pytest.skip(
            "Debian's chromium and Node 20 drive the page (`make test` installs chromium as root; "
            "else sudo apt-get install --no-install-recommends chromium)"
        )
    _, ports = stack
    ui = f"http://127.0.0.1:{ports['frontend']}"
    page = httpx.get(f"{ui}/")
    assert page.status_code == 200 and '<meta name="tandem-gateway-url" content="/" />' in page.text
    assert httpx.get(f"{ui}/v1/models").json()["data"][0]["id"] == MODEL  # nginx forwards the API
    assert "access-control-allow-origin" not in httpx.get(f"{ui}/v1/models", headers={"Origin": ui}).headers
    cfg = {
        "ui": f"{ui}/",
        "chromium": str(CHROMIUM),
        "out": str(tmp_path),
        "stages": ["stage-1", "stage-2", "stage-3"],
    }
    done = subprocess.run(
        ["node", "e2e/container.mjs", json.dumps(cfg)],
        cwd=REPO_ROOT / "frontend",
        capture_output=True,
        text=True,
        timeout=180,
    )
    seen = json.loads((tmp_path / "results.json").read_text())
    assert done.returncode == 0, f"{seen.get('failure')}\n{done.stderr}\nscreens in {tmp_path}"
    assert seen["status"].startswith("Finished") and seen["generated"] == "12", seen
    assert {u.split("/")[2] for u in seen["requests"]} == {f"127.0.0.1:{ports['frontend']}"}  # one origin
    assert any("/v1/completions" in u for u in seen["requests"]) and any(
        "/api/nodes" in u for u in seen["requests"]
    )
    assert seen["consoleErrors"] == [], seen["consoleErrors"]


def test_every_service_and_replica_sends_traces(
    stack: tuple[Path, dict[str, int]], otlp: OtlpReceiver
) -> None:
    _, ports = stack
    prompts = [f"trace {i} the pipeline" for i in range(16)]  # sequences land on both stage-2 replicas
    r = httpx.post(
        f"http://127.0.0.1:{ports['gateway']}/v1/completions",
        json={"prompt": prompts, "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text

    def replicas_seen(spans: list[Any]) -> set[Any]:
        return {s.service for s in spans} | {
            s.attributes.get("server.port") or s.attributes.get("net.host.port") for s in spans
        }

    wanted = {"gateway", "tokenizer", "stage-1", "stage-2", "stage-3", ports["stage-2"], ports[FETCHING]}
    spans = otlp.wait_for(lambda spans: wanted <= replicas_seen(spans), timeout=30)
    assert wanted <= replicas_seen(spans)


def test_the_monitoring_file_on_its_own_scrapes_every_replica(
    engine: DockerEngine, stack: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    """`docker-compose -f docker-compose.monitoring.yml up -d` as the original runs it (Prometheus
    only: Grafana's and Jaeger's images cannot be pulled here), host networking, on free ports."""
    _, ports = stack
    doc = merged(engine, [MONITORING, OVERRIDES / "host-network.monitoring.yml"], {})
    prometheus = doc["services"]["prometheus"]
    config = yaml.safe_load((REPO_ROOT / "observability" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"  # the committed 15 s, shortened for the test
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [f"{t.split(':')[0]}:{ports[t.split(':')[0]]}" for t in group["targets"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(REPO_ROOT / "observability" / "prometheus" / "rules", tmp_path / "rules")
    tmp_path.chmod(0o755)
    port = free_port()
    prometheus.pop("ports", None)
    prometheus["volumes"] = [f"{tmp_path}:/etc/prometheus:ro"]
    prometheus["command"] = [*prometheus["command"], f"--web.listen-address=127.0.0.1:{port}"]
    path = tmp_path / "monitoring.yml"
    path.write_text(yaml.safe_dump({"services": {"prometheus": prometheus}}))
    try:
        engine.compose([path], PROJECT, "up", "--detach", "--no-build", "prometheus", timeout=120)
        scraped: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(scraped) < 6:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets").json()["data"]["activeTargets"]
            except (httpx.TransportError, ValueError):
                targets = []
            scraped = {
                t["labels"]["instance"].split(":")[0]: t["labels"] for t in targets if t["health"] == "up"
            }
            time.sleep(0.5)
    finally:
        logs = engine.compose([path], PROJECT, "logs", "--tail=20", check=False).stdout
        engine.compose([path], PROJECT, "rm", "--force", "--stop", "prometheus", check=False)
    assert set(scraped) == {"gateway", "tokenizer", "stage-1", "stage-2", FETCHING, "stage-3"}, logs
    assert scraped[FETCHING]["stage"] == "stage-2" and scraped[FETCHING]["replica"] == FETCHING
