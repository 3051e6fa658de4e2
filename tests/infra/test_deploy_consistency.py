"""The deployment files agree with the code: every environment variable they set is one the code
(or a library it hands the variable to) reads; every probe and health check asks a route the
role's app really serves; every port a process listens on is the port its container declares,
its probes use and its callers (Services, the gateway's config) address.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import opentelemetry.sdk.environment_variables as otel_sdk_env
import pytest

from functions import contract
from functions.app import litestar_app
from functions.settings import FunctionSettings
from functions.stage import create_stage_app
from functions.stage_state import StageSettings
from functions.tokenizer import create_tokenizer_app
from gateway.app import create_gateway_app
from gateway.config import _TUNABLE, load_config, parse_config
from tests.helpers.bundles import make_fake_bundle
from tests.helpers.procs import REPO_ROOT
from tests.infra.deploy_files import (
    CLOUDRUN_FILES,
    K8S_FILES,
    KNATIVE_FILES,
    KSERVE_FILES,
    SERVE_DOCKERFILE,
    Container,
    compose_containers,
    dockerfile_stages,
    image_env,
    manifest_containers,
    pod_specs,
    yaml_docs,
)

PACKAGES = ("functions", "gateway", "export", "infra")
WRITERS = ("infra/deploy",)  # the generator spells the names it writes: that is not reading them
ENV_NAME = re.compile(r"^(TANDEM|OTEL)_[A-Z0-9_]+$|^PORT$")
SHELL_READ = re.compile(r"\$\{?((?:TANDEM|OTEL)_[A-Z0-9_]+|PORT)\b")
# read by the Python interpreter itself, or by the libraries named (checked below)
INTERPRETER = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
LIBRARY = {"HF_HOME": "huggingface_hub.constants"}
# read by the platform around the container: KServe's storage initializer and its protocol switch
PLATFORM = {"STORAGE_URI", "PROTOCOL"}
IMAGE_TARGET = {"tokenizer": "function", "stage": "function", "gateway": "gateway"}


def names_in_code() -> set[str]:
    """Every TANDEM_*/OTEL_*/PORT name spelled as a string in the packages, the gateway's tunables
    (read as TANDEM_<KEY>), and the OTEL_* variables of the OpenTelemetry SDK the services use."""
    names = set()
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if path.parent.relative_to(REPO_ROOT).as_posix().startswith(WRITERS):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and ENV_NAME.match(node.value)
                ):
                    names.add(node.value)
    for script in (REPO_ROOT / "infra" / "docker").glob("*.sh"):  # the UI container's entry point
        names |= set(SHELL_READ.findall(script.read_text()))
    names |= {f"TANDEM_{key.upper()}" for key in _TUNABLE}
    names |= {v for k, v in vars(otel_sdk_env).items() if k.startswith("OTEL_") and isinstance(v, str)}
    return names


def all_containers() -> list[Container]:
    """Every container of this repository's images (the monitoring tools' are theirs)."""
    return [c for c in [*compose_containers(), *manifest_containers()] if c.role != "monitoring"]


def set_env_names() -> dict[str, list[str]]:
    """Variable -> where it is set (containers of every platform, and the Dockerfiles' ENV)."""
    where: dict[str, list[str]] = {}
    for c in all_containers():
        for name in c.env:
            where.setdefault(name, []).append(c.where)
    for path in (REPO_ROOT / "infra" / "docker").glob("*.Dockerfile"):
        for stage, info in dockerfile_stages(path).items():
            for name in info["env"]:
                where.setdefault(name, []).append(f"{path.name} ({stage})")
    return where


def test_every_variable_set_is_read_by_the_code() -> None:
    read = names_in_code()
    assert {"PORT", "TANDEM_HOST", "TANDEM_THREADS", "TANDEM_MAX_RUNNING", "OTEL_SERVICE_NAME"} <= read
    assert "TANDEM_NOT_A_SETTING" not in read
    for name, module in LIBRARY.items():
        source = Path(__import__(module, fromlist=["_"]).__file__ or "").read_text()
        assert f'"{name}"' in source, f"{module} no longer reads {name}"
    unread = {
        name: places
        for name, places in set_env_names().items()
        if name not in read | INTERPRETER | set(LIBRARY) | PLATFORM
    }
    assert not unread, f"set but never read: {unread}"
    assert "TANDEM_GATEWAY_URL" in read and "TANDEM_EXPORT_OUT" in read  # the UI's script, export.job


def test_every_function_and_gateway_takes_the_service_token() -> None:
    """functions.auth on every platform: each tokenizer, stage and gateway container gets
    TANDEM_AUTH_TOKEN (from a secret, or the host's environment in compose), the gateway also
    TANDEM_API_KEYS, and no other container either."""
    read = names_in_code()
    assert {"TANDEM_AUTH_TOKEN", "TANDEM_API_KEYS"} <= read
    overrides = ("host-network.yml", "docker-compose.monitoring.yml")  # merged onto docker-compose.yml
    whole = [c for c in all_containers() if not c.where.startswith(overrides)]
    served = [c for c in whole if c.role in ("tokenizer", "stage", "gateway")]
    assert {c.platform for c in served} == {"compose", "k8s", "knative", "cloudrun", "kserve"}
    for c in whole:
        assert ("TANDEM_AUTH_TOKEN" in c.env) == (c in served), c.where
        assert ("TANDEM_API_KEYS" in c.env) == (c.role == "gateway"), c.where


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The GET routes each role's app serves, from the apps themselves (nothing started)."""
    bundle = make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle")
    settings = FunctionSettings(port=0)
    cfg = parse_config(json.loads((REPO_ROOT / "infra" / "compose" / "config.json").read_text()), env={})
    apps = {
        "tokenizer": create_tokenizer_app(bundle, settings),
        "stage": create_stage_app(StageSettings(bundle=bundle, stage=contract.stage_name(1)), settings),
        "gateway": create_gateway_app(cfg, settings),
    }
    return {
        role: {r.path for r in litestar_app(app).routes if "GET" in getattr(r, "methods", ())}
        for role, app in apps.items()
    }


def test_every_probe_asks_a_route_the_app_serves(routes: dict[str, set[str]]) -> None:
    probes = [(c.where, c.role, path) for c in all_containers() for path, _ in c.probes]
    for path in (REPO_ROOT / "infra" / "docker").glob("*.Dockerfile"):
        for target, info in dockerfile_stages(path).items():
            check = info["healthcheck"]
            if check and "functions.healthcheck" in check:
                role = "gateway" if target == "gateway" else "stage"
                probes.append((f"{path.name} {target}", role, json.loads(check.split("CMD", 1)[1])[-1]))
    assert len(probes) >= 40
    wrong = []
    for where, role, path in probes:
        if role == "frontend":
            assert path == "/", where  # nginx's static root
        elif role == "store":
            assert path.endswith("/manifest.json"), where  # ready once the export has published
        elif path not in routes[role]:
            wrong.append(f"{where}: {path} is not a route of the {role} ({sorted(routes[role])})")
    assert not wrong, "\n".join(wrong)


def listen_port(c: Container) -> int | None:
    """The port the container's process listens on: PORT as set, else the image's default
    (Knative and Cloud Run set PORT to the declared containerPort themselves)."""
    if c.env.get("PORT"):
        return int(str(c.env["PORT"]))
    if c.platform in ("knative", "cloudrun"):
        return next(iter(c.ports.values()), 8080)
    target = IMAGE_TARGET.get(c.role)
    return int(image_env(target)["PORT"]) if target else None


def test_images_expose_the_port_they_listen_on() -> None:
    stages = dockerfile_stages(SERVE_DOCKERFILE)
    for target in ("function", "gateway"):
        assert stages[target]["expose"] == [int(image_env(target)["PORT"])], target
    assert image_env("function")["PORT"] == "8080" and image_env("gateway")["PORT"] == "8000"


def test_compose_publishes_the_ports_the_services_listen_on() -> None:
    published = [c for c in compose_containers() if c.ports]
    assert {c.role for c in published} == {"gateway", "frontend"}
    for c in published:
        port = 5173 if c.role == "frontend" else listen_port(c)  # nginx.conf: listen 5173
        assert list(c.ports.values()) == [port], f"{c.where}: publishes {c.ports}, listens on {port}"


def test_containers_listen_where_they_declare_and_are_probed() -> None:
    checked = 0
    for c in manifest_containers():
        port = listen_port(c)
        if c.role in ("export", "monitoring"):
            continue  # a job (no port), or another project's image
        if c.role == "frontend":
            assert port == 5173, c.where  # the UI image's PORT, its EXPOSE
        elif c.role == "store":
            port = int(c.command[c.command.index("http.server") + 1])  # python -m http.server PORT
        assert port in c.ports.values(), f"{c.where}: listens on {port}, declares {c.ports}"
        for path, probe_port in c.probes:
            resolved = c.ports.get(probe_port, probe_port) if isinstance(probe_port, str) else probe_port
            assert resolved in (None, port), f"{c.where}: probe {path} on {probe_port}, listens on {port}"
        checked += 1
    assert checked >= 15


def k8s_service_ports() -> dict[str, int]:
    """Service name -> the container port its first port leads to (through targetPort)."""
    docs = [d for f in K8S_FILES for d in yaml_docs(f)]
    workloads = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    out = {}
    for d in docs:
        if d["kind"] != "Service":
            continue
        name, port = d["metadata"]["name"], d["spec"]["ports"][0]
        container = workloads[d["spec"]["selector"]["app.kubernetes.io/name"]]
        named = {p.get("name"): p["containerPort"] for p in container["ports"]}
        target = port["targetPort"]
        assert named.get(target, target) == port["port"], f"Service {name} forwards {port} to {named}"
        out[name] = port["port"]
    return out


def gateway_config(path: Path) -> Any:
    return load_config(path, env={})


def test_gateway_configs_address_the_ports_the_services_listen_on() -> None:
    # compose: a service named like the host, its PORT
    compose_ports = {c.where.split()[-1]: listen_port(c) for c in compose_containers() if c.env.get("PORT")}
    cfg = gateway_config(REPO_ROOT / "infra" / "compose" / "config.json")
    addresses = [cfg.tokenizer, *(n.address for n in cfg.nodes)]
    for address in addresses:
        host, port = address.rsplit(":", 1)
        assert compose_ports.get(host) == int(port), (
            f"compose: {address} but {host} listens on {compose_ports.get(host)}"
        )
    # Kubernetes: <pod>.<headless service>:port or <service>:port, through the Service
    services = k8s_service_ports()
    config_map = next(d for f in K8S_FILES for d in yaml_docs(f) if d["kind"] == "ConfigMap")
    cfg = parse_config(json.loads(config_map["data"]["config.json"]), env={})
    replicas = {
        d["metadata"]["name"]: d["spec"]["replicas"]
        for f in K8S_FILES
        for d in yaml_docs(f)
        if d["kind"] == "StatefulSet"
    }
    for address in [cfg.tokenizer, *(n.address for n in cfg.nodes)]:
        host, port = address.rsplit(":", 1)
        service = host.split(".")[-1]
        assert services.get(service) == int(port), (
            f"k8s: {address} but Service {service} is on {services.get(service)}"
        )
        if "." in host:  # a StatefulSet pod: its ordinal must exist
            pod, ordinal = host.split(".")[0].rsplit("-", 1)
            assert pod == service and int(ordinal) < replicas[service], f"k8s: no pod {host}"
    assert len({n.address for n in cfg.nodes}) == sum(replicas.values())
    # Knative: the gateway reaches the functions by their Knative Service names
    names = {d["metadata"]["name"] for f in KNATIVE_FILES for d in yaml_docs(f) if d["kind"] == "Service"}
    config_map = next(d for f in KNATIVE_FILES for d in yaml_docs(f) if d["kind"] == "ConfigMap")
    cfg = parse_config(json.loads(config_map["data"]["config.json"]), env={})
    for address in [cfg.tokenizer, *(n.address for n in cfg.nodes)]:
        assert address.split("//")[1].split(".")[0] in names, f"knative: no Service for {address}"
    # KServe: <InferenceService>-predictor, the Service KServe makes for it in either mode
    names = {
        d["metadata"]["name"] for f in KSERVE_FILES for d in yaml_docs(f) if d["kind"] == "InferenceService"
    }
    config_map = next(d for f in KSERVE_FILES for d in yaml_docs(f) if d["kind"] == "ConfigMap")
    cfg = parse_config(json.loads(config_map["data"]["config.json"]), env={})
    for address in [cfg.tokenizer, *(n.address for n in cfg.nodes)]:
        host = address.split("//")[1].split(".")[0]
        assert host.removesuffix("-predictor") in names, f"kserve: no InferenceService for {address}"
    # Cloud Run: https://<service>-HASH-REGION.a.run.app, one service file each
    cfg = gateway_config(REPO_ROOT / "infra" / "cloudrun" / "config.json")
    names = {d["metadata"]["name"] for f in CLOUDRUN_FILES for d in yaml_docs(f) if d["kind"] == "Service"}
    for address in [cfg.tokenizer, *(n.address for n in cfg.nodes)]:
        assert address.split("//")[1].removesuffix("-HASH-REGION.a.run.app") in names, f"cloud run: {address}"


def test_every_workload_mounts_the_gateway_config_it_is_told_to_read() -> None:
    for f in K8S_FILES + KNATIVE_FILES:
        for where, spec in pod_specs(f):
            for c in spec["containers"]:
                if "--config" in c.get("command", []):
                    path = Path(c["command"][c["command"].index("--config") + 1])
                    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                    assert str(path.parent) in mounts, f"{where}: {path} is not mounted"
