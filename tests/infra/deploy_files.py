"""Reads every deployment file of the repository into one shape, so the checks can ask the same
questions of compose, Kubernetes, Knative and Cloud Run: which containers run which role, with
which environment, listening on which port, probed on which paths.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.procs import REPO_ROOT


@dataclass(frozen=True)
class Files:
    """The deployment files under `root`: the repository, or the generator's output for another N."""

    root: Path

    @property
    def compose(self) -> list[Path]:
        return sorted(self.root.glob("docker-compose*.yml")) + sorted(
            (self.root / "infra" / "compose").glob("*.yml")
        )

    def folder(self, name: str) -> list[Path]:
        return sorted((self.root / "infra" / name).glob("*.yaml"))

    @property
    def k8s(self) -> list[Path]:
        return self.folder("k8s")

    @property
    def knative(self) -> list[Path]:
        return self.folder("knative")

    @property
    def cloudrun(self) -> list[Path]:
        return self.folder("cloudrun")

    @property
    def kserve(self) -> list[Path]:
        return self.folder("kserve")


REPO = Files(REPO_ROOT)
COMPOSE_FILES = REPO.compose
K8S_FILES = REPO.k8s
KNATIVE_FILES = REPO.knative
CLOUDRUN_FILES = REPO.cloudrun
KSERVE_FILES = REPO.kserve
DOCKERFILES = sorted((REPO_ROOT / "infra" / "docker").glob("*.Dockerfile"))
SERVE_DOCKERFILE = REPO_ROOT / "infra" / "docker" / "serve.Dockerfile"
# images of other projects the manifests run (monitoring): their variables are theirs
THIRD_PARTY = ("prom/prometheus", "grafana/grafana", "jaegertracing/")

# the images built from this repository, by role (what their processes are); "store" is the
# function image serving the bundle volume (python -m http.server), "monitoring" a third-party image
ROLES = ("tokenizer", "stage", "gateway", "frontend", "export", "store", "monitoring")


@dataclass
class Container:
    where: str  # file and resource, for messages
    platform: str  # compose, k8s, knative, cloudrun
    role: str
    env: dict[str, str | None]  # None: from a ConfigMap or secret
    ports: dict[str, int] = field(default_factory=dict)  # container port by name ("" unnamed)
    probes: list[tuple[str, int | str | None]] = field(default_factory=list)  # (path, port)
    command: list[str] = field(default_factory=list)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def role_of(command: list[str], image: str) -> str:
    words = " ".join(command)
    if image.startswith(THIRD_PARTY):
        return "monitoring"
    if "http.server" in words:
        return "store"
    if "functions.stage" in words:
        return "stage"
    if "functions.tokenizer" in words:
        return "tokenizer"
    if "-m gateway" in words:
        return "gateway"
    for role in ("frontend", "export", "gateway"):
        if role in image:
            return role
    if "function" in image:  # the function image's default command is the tokenizer
        return "tokenizer"
    raise AssertionError(f"cannot tell the role of image {image!r} running {command!r}")


def _env(items: list[dict[str, Any]] | None) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in items or []}


def _pod_containers(spec: dict[str, Any], where: str, platform: str) -> Iterator[Container]:
    for c in spec.get("containers", []):
        cmd = [*c.get("command", []), *c.get("args", [])]
        probes = []
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = (c.get(kind) or {}).get("httpGet")
            if get:
                probes.append((get["path"], get.get("port")))
        yield Container(
            where=f"{where} container {c.get('name', '')}".strip(),
            platform=platform,
            role=role_of(cmd, c["image"]),
            env=_env(c.get("env")),
            ports={p.get("name", ""): p["containerPort"] for p in c.get("ports", [])},
            probes=probes,
            command=cmd,
        )


def pod_specs(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(resource, pod spec) of every workload in a Kubernetes, Knative, Cloud Run or KServe file
    (an InferenceService's predictor holds its pod spec's fields itself)."""
    for doc in yaml_docs(path):
        where = f"{path.name} {doc['kind']}/{doc['metadata']['name']}"
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "Service", "Job") and "template" in spec:
            template = spec["template"]["spec"]
            yield where, template["template"]["spec"] if "template" in template else template
        elif kind == "InferenceService":
            yield where, spec["predictor"]


def manifest_containers(files: Files = REPO) -> Iterator[Container]:
    platforms = (
        ("k8s", files.k8s),
        ("knative", files.knative),
        ("cloudrun", files.cloudrun),
        ("kserve", files.kserve),
    )
    for platform, paths in platforms:
        for path in paths:
            for where, spec in pod_specs(path):
                yield from _pod_containers(spec, where, platform)


def compose_containers() -> Iterator[Container]:
    """Services of the compose files that run this repository's images (monitoring tools aside)."""
    base = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for path in COMPOSE_FILES:
        for name, svc in (yaml.safe_load(path.read_text()).get("services") or {}).items():
            image = svc.get("image") or base.get(name, {}).get("image", "")
            if not image.startswith("tandem-"):
                continue
            command = svc.get("command") or base.get(name, {}).get("command") or []
            command = shlex.split(command) if isinstance(command, str) else command
            env = svc.get("environment") or {}
            if isinstance(env, list):
                env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
            test = (svc.get("healthcheck") or {}).get("test") or []
            probes = [(test[-1], None)] if "functions.healthcheck" in test else []
            published = [str(p).rsplit(":", 1)[-1] for p in svc.get("ports") or []]  # "8000:8000"
            yield Container(
                where=f"{path.name} service {name}",
                platform="compose",
                role=role_of(command, image),
                env={k: None if v is None else str(v) for k, v in env.items()},
                ports={f"published {i}": int(p) for i, p in enumerate(published)},
                probes=probes,
            )


def dockerfile_stages(path: Path) -> dict[str, dict[str, Any]]:
    """Per build stage (its name, or its index): the ENV it sets and its HEALTHCHECK command."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] = {}
    logical = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not logical:
            continue
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        line, logical = (logical + raw).strip(), ""
        if not line:
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            current = stages.setdefault(
                name, {"env": {}, "healthcheck": None, "from": parts[0], "expose": []}
            )
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                current["env"][key] = value
        elif word == "EXPOSE":
            current["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "HEALTHCHECK":
            current["healthcheck"] = rest
    return stages


def image_env(target: str) -> dict[str, str]:
    """The environment a serve.Dockerfile target inherits from the stages it is built on."""
    stages = dockerfile_stages(SERVE_DOCKERFILE)
    env: dict[str, str] = {}
    chain = []
    name: str | None = target
    while name in stages:
        chain.append(name)
        name = stages[name]["from"]
    for n in reversed(chain):
        env.update(stages[n]["env"])
    return env
