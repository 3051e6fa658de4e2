"""Every deployment file passes a validator that knows its type: compose files the Compose
Specification schema, Kubernetes manifests the Kubernetes OpenAPI schemas (strict), Knative and
Cloud Run services the Knative Serving schema (@kubernetes-models/knative) and their pod specs the
Kubernetes PodSpec schema (strict), Dockerfiles hadolint. Each validator is first shown to reject
a broken copy, so a check that passes everything cannot pass here.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers.procs import REPO_ROOT
from tests.infra.deploy_files import (
    CLOUDRUN_FILES,
    COMPOSE_FILES,
    DOCKERFILES,
    K8S_FILES,
    KNATIVE_FILES,
    pod_specs,
    yaml_docs,
)

BIN = Path(sys.executable).parent
VALIDATE_DIR = REPO_ROOT / "infra" / "validate"
K8S_VERSION = "1.33"
# fields Knative and Cloud Run add to a pod spec (the rest must be a valid Kubernetes PodSpec)
SERVING_FIELDS = (
    "containerConcurrency",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
)
JOB_FIELDS = ("maxRetries", "timeoutSeconds")
# annotations the templates may carry: Knative's autoscaler and Cloud Run's documented ones
KNOWN_ANNOTATIONS = {
    "autoscaling.knative.dev/" + k
    for k in ("metric", "target", "min-scale", "max-scale", "initial-scale", "scale-down-delay", "window")
} | {"autoscaling.knative.dev/minScale", "autoscaling.knative.dev/maxScale"}
KNOWN_ANNOTATIONS |= {
    "run.googleapis.com/" + k
    for k in (
        "cpu-throttling",
        "startup-cpu-boost",
        "sessionAffinity",
        "execution-environment",
        "gpu-zonal-redundancy-disabled",
        "ingress",
    )
}


def run(*cmd: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)


def broken_copy(src: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = src.read_text()
    assert old in text, f"{old!r} not in {src}"
    out = tmp_path / src.name
    out.write_text(text.replace(old, new, 1))
    return out


# ---- compose ----


def test_compose_files_match_the_compose_specification(tmp_path: Path) -> None:
    check = [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec"]
    broken = broken_copy(
        REPO_ROOT / "docker-compose.yml", tmp_path, "condition: service_healthy", "condition: up"
    )
    assert run(*check, broken).returncode != 0
    r = run(*check, *COMPOSE_FILES)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed (CI installs it)"
)
def test_docker_compose_reads_the_files_as_merged() -> None:
    files = ["-f", "docker-compose.yml", "-f", "infra/compose/host-network.yml"]
    r = run("docker-compose", *files, "config", "--quiet")
    assert r.returncode == 0, r.stderr


# ---- Kubernetes ----


def k8s_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}"
    return None


def test_kubernetes_manifests_validate_strictly(tmp_path: Path) -> None:
    stages = REPO_ROOT / "infra" / "k8s" / "stages.yaml"
    broken = broken_copy(stages, tmp_path, "periodSeconds: 5", "periodSecond: 5")
    assert any(k8s_errors(d) for d in yaml_docs(broken))
    docs = [d for f in K8S_FILES for d in yaml_docs(f)]
    docs += [d for f in KNATIVE_FILES + CLOUDRUN_FILES for d in yaml_docs(f) if d["apiVersion"] == "v1"]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "Service"} <= kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"model-inference"}
    errors = [e for e in map(k8s_errors, docs) if e]
    assert not errors, "\n".join(errors)


def as_pod(spec: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """A Knative/Cloud Run pod spec as a Kubernetes Pod: their own fields out, the container names
    and probe ports that Knative fills in put in."""
    spec = {k: v for k, v in copy.deepcopy(spec).items() if k not in drop}
    for i, c in enumerate(spec.get("containers", [])):
        c.setdefault("name", f"c{i}")
        port = (c.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "httpGet" in c.get(kind, {}):
                c[kind]["httpGet"].setdefault("port", port)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


def serving_pod_errors(path: Path) -> list[str]:
    errors = []
    for where, spec in pod_specs(path):
        drop = JOB_FIELDS if "Job/" in where else SERVING_FIELDS
        e = k8s_errors(as_pod(spec, drop))
        if e:
            errors.append(f"{where}: {e}")
    return errors


def test_knative_and_cloud_run_pod_specs_are_valid_kubernetes(tmp_path: Path) -> None:
    broken = broken_copy(
        REPO_ROOT / "infra" / "cloudrun" / "stage-1.yaml", tmp_path, "port: 8080}", "port: 8080, verb: GET}"
    )
    assert serving_pod_errors(broken)
    errors = [e for f in KNATIVE_FILES + CLOUDRUN_FILES for e in serving_pod_errors(f)]
    assert not errors, "\n".join(errors)
    assert sum(1 for f in KNATIVE_FILES + CLOUDRUN_FILES for _ in pod_specs(f)) >= 11


def test_serving_annotations_are_known_ones() -> None:
    unknown = []
    for f in KNATIVE_FILES + CLOUDRUN_FILES:
        for doc in yaml_docs(f):
            for holder in (doc.get("spec", {}).get("template", {}), doc):
                for key in (holder.get("metadata") or {}).get("annotations", {}):
                    if key not in KNOWN_ANNOTATIONS:
                        unknown.append(f"{f.name}: {key}")
    assert not unknown, unknown


@pytest.fixture(scope="module")
def knative_validator() -> Path:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node/npm not installed (CI has them)")
    r = run("npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=VALIDATE_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    return VALIDATE_DIR / "validate.mjs"


def test_knative_and_cloud_run_services_match_the_knative_schema(
    knative_validator: Path, tmp_path: Path
) -> None:
    gateway = REPO_ROOT / "infra" / "knative" / "gateway.yaml"
    broken = broken_copy(gateway, tmp_path, "timeoutSeconds: 3600", 'timeoutSeconds: "an hour"')
    r = run("node", knative_validator, broken)
    assert r.returncode == 1 and "INVALID" in r.stdout, r.stdout + r.stderr
    r = run("node", knative_validator, *KNATIVE_FILES, *CLOUDRUN_FILES)
    assert r.returncode == 0, r.stdout + r.stderr
    services = [d for f in KNATIVE_FILES + CLOUDRUN_FILES for d in yaml_docs(f) if d["kind"] == "Service"]
    assert r.stdout.count("\nvalid ") + r.stdout.startswith("valid ") == len(services) >= 10


# ---- Dockerfiles ----


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    assert run(BIN / "hadolint", bad).returncode != 0
    assert len(DOCKERFILES) == 4  # serve (function, gateway, CUDA), bundle, export, frontend
    r = run(BIN / "hadolint", *DOCKERFILES)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_and_manifests_are_yaml_documents() -> None:
    for f in COMPOSE_FILES + K8S_FILES + KNATIVE_FILES + CLOUDRUN_FILES:
        assert yaml_docs(f), f"{f} has no YAML document"
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(f.read_text()) if d)
