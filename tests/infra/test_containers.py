"""The deployment images really build and run: a private dockerd (host networking only) builds the
serving and gateway images on a Debian base made here, docker-compose starts docker-compose.yml
with infra/compose/host-network.yml and the tiny random-weight bundle mounted (the stage-2
replica instead fetches its file over HTTP at start, as from an object store), and a completion
comes back through the containers, token for token what PyTorch generates. The images run as
non-root and every container's HEALTHCHECK reports healthy.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Reference
from tests.helpers.docker import DockerEngine, ensure_base_image, missing_tools, wheelhouse
from tests.helpers.procs import REPO_ROOT, free_port
from tests.helpers.static_server import serve_directory

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

COMPOSE = REPO_ROOT / "docker-compose.yml"
SERVICE_TOKEN = "container-test-service-token-0123456789"
HOST_NETWORK = REPO_ROOT / "infra" / "compose" / "host-network.yml"
CONFIG = REPO_ROOT / "infra" / "compose" / "config.json"
DOCKERFILE = "infra/docker/serve.Dockerfile"
IMAGES = {"function": "tandem-function:latest", "gateway": "tandem-gateway:latest"}
PROJECT = "tandemtest"
NON_ROOT = "10001"
FETCHING = "stage-2-b"  # this replica fetches its bundle (TANDEM_BUNDLE_URL) instead of mounting it


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


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> dict[str, str]:
    started = time.monotonic()
    base = ensure_base_image(engine)
    print(f"\n[docker] base image {base} ready in {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    wheelhouse(engine, base)
    print(f"[docker] wheels for the images downloaded in {time.monotonic() - started:.0f} s")
    for target, tag in IMAGES.items():
        started = time.monotonic()
        engine.run(
            "build", "--network=host", "--file", DOCKERFILE, "--target", target,
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "PIP_ARGS=--no-index",
            "--tag", tag, ".",
        )  # fmt: skip
        print(
            f"[docker] built {tag} in {time.monotonic() - started:.0f} s: {engine.image_size_mb(tag):.0f} MB"
        )
    print(f"[docker] base {base}: {engine.image_size_mb(base):.0f} MB")
    return IMAGES


@pytest.fixture(scope="module")
def readable_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle as the containers' non-root user can read it once mounted (pytest makes its
    directories 0700; a bind mount shows the directory's own mode, not its parents')."""
    bundle = tmp_path_factory.mktemp("mounted") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    bundle.chmod(0o755)
    for f in bundle.iterdir():
        f.chmod(0o644)
    return bundle


def host_network_stack(
    engine: DockerEngine, bundle: Path, bundle_url: str, workdir: Path
) -> tuple[Path, dict[str, int]]:
    """docker-compose.yml + host-network.yml merged, on free ports (other stacks may hold 8000-8112).

    docker-compose 1.29 cannot drop `ports` in an override, and Docker refuses published ports
    with host networking, so the merged file leaves them out. Returns the file and the ports.
    """
    env = {"BUNDLE": str(bundle), "TANDEM_AUTH_TOKEN": SERVICE_TOKEN}  # the functions want a token
    merged = engine.compose([COMPOSE, HOST_NETWORK], PROJECT, "config", env=env).stdout
    doc: dict[str, Any] = yaml.safe_load(merged)
    config = json.loads(CONFIG.read_text())
    ports = {name: free_port() for name in doc["services"]}
    for name, service in doc["services"].items():
        service.pop("ports", None)
        service.setdefault("environment", {})["PORT"] = str(ports[name])
    fetching = doc["services"][FETCHING]
    fetching.pop("volumes")
    fetching["tmpfs"] = [f"/bundle:uid={NON_ROOT},gid={NON_ROOT}"]
    fetching["environment"]["TANDEM_BUNDLE_URL"] = bundle_url
    config["tokenizer"]["address"] = f"tokenizer:{ports['tokenizer']}"
    for node in config["nodes"]:
        host = node["address"].split(":")[0]
        node["address"] = f"{host}:{ports[host]}"
    (workdir / "config.json").write_text(json.dumps(config))
    volumes = doc["services"]["gateway"]["volumes"]
    doc["services"]["gateway"]["volumes"] = [
        v.replace(str(CONFIG), str(workdir / "config.json")) if isinstance(v, str) else v for v in volumes
    ]
    path = workdir / "compose.yml"
    path.write_text(yaml.safe_dump(doc))
    return path, ports


@pytest.fixture(scope="module")
def bundle_store(tiny_bundle: Path) -> Iterator[tuple[str, list[str]]]:
    """The bundle over HTTP on the host, as an object store would serve it."""
    with serve_directory(tiny_bundle) as served:
        yield served


@pytest.fixture(scope="module")
def stack(
    engine: DockerEngine,
    images: dict[str, str],
    readable_bundle: Path,
    bundle_store: tuple[str, list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, int]]]:
    url, _ = bundle_store
    path, ports = host_network_stack(engine, readable_bundle, url, tmp_path_factory.mktemp("compose"))
    started = time.monotonic()
    try:
        # compose starts the gateway only once every function reports healthy
        engine.compose([path], PROJECT, "up", "--detach", "--no-build", "gateway", timeout=300)
        wait_healthy(engine, path, timeout=180)
        print(f"\n[docker] compose stack healthy in {time.monotonic() - started:.0f} s")
        yield path, ports
    finally:
        logs = engine.compose([path], PROJECT, "logs", "--tail=30", check=False).stdout
        engine.compose([path], PROJECT, "down", "--timeout=10", check=False, timeout=120)
        print(f"[docker] last container logs:\n{logs[-4000:]}")


def containers(engine: DockerEngine, compose_file: Path) -> list[str]:
    return engine.compose([compose_file], PROJECT, "ps", "--quiet").stdout.split()


def health(engine: DockerEngine, container: str) -> tuple[str, str]:
    fmt = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}"
    name, status = engine.run("inspect", "--format", fmt, container).stdout.split()
    return name.lstrip("/"), status


def wait_healthy(engine: DockerEngine, compose_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        states = [health(engine, c) for c in containers(engine, compose_file)]
        if len(states) == 6 and all(s == "healthy" for _, s in states):
            return
        time.sleep(1.0)
    raise AssertionError(f"containers not healthy after {timeout:.0f} s: {states}")


def test_images_run_as_non_root_without_torch(engine: DockerEngine, images: dict[str, str]) -> None:
    for tag in images.values():
        assert engine.run("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == (
            f"{NON_ROOT}:{NON_ROOT}"
        )
        probe = "import importlib.util as u, os; print(os.getuid(), u.find_spec('torch') is None)"
        out = engine.run("run", "--rm", "--network=host", tag, "python", "-c", probe).stdout.split()
        assert out == [NON_ROOT, "True"], f"{tag}: uid and torch-free check gave {out}"


def test_a_replica_fetched_and_verified_its_bundle_at_start(
    engine: DockerEngine, stack: tuple[Path, dict[str, int]], bundle_store: tuple[str, list[str]]
) -> None:
    _, ports = stack
    _, requested = bundle_store
    # the manifest and this stage's file only, before the container reported healthy
    assert sorted(set(requested)) == ["/manifest.json", "/stage2.onnx"]
    auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    r = httpx.get(f"http://127.0.0.1:{ports[FETCHING]}/v2/models/stage-2", headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "stage-2"


def test_compose_stack_serves_a_completion(
    engine: DockerEngine, stack: tuple[Path, dict[str, int]], reference: Reference
) -> None:
    compose_file, ports = stack
    states = dict(health(engine, c) for c in containers(engine, compose_file))
    assert len(states) == 6 and set(states.values()) == {"healthy"}, states
    for c in containers(engine, compose_file):  # the serving processes themselves, not only the images
        assert engine.run("exec", c, "id", "-u").stdout.strip() == NON_ROOT
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    prompt = "Hello, how are you?"
    tokenizer = f"http://127.0.0.1:{ports['tokenizer']}/v1/encode"
    refused = httpx.post(tokenizer, json={"text": prompt})  # the service token is on (functions.auth)
    assert refused.status_code == 401 and "TANDEM_AUTH_TOKEN" in refused.json()["detail"], refused.text
    auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    ids = httpx.post(tokenizer, json={"text": prompt}, headers=auth).json()["ids"]
    r = httpx.post(
        f"{gateway}/api/model/process",
        json={"text": prompt, "metadata": {"max_tokens": 8, "ignore_eos": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == reference.greedy(ids, 8)
    r = httpx.post(
        f"{gateway}/v1/completions",
        json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 5,
        "total_tokens": len(ids) + 5,
    }
