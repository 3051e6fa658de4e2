"""Every deployment file passes a validator that knows its type, for the committed files (the
generator's output for 3 stages, which they must equal) and for the generator's output for 2 and
4 stages: compose files the Compose Specification schema and docker-compose itself (each file as
docs/deploy.md runs it, the monitoring file on its own), Kubernetes manifests the Kubernetes
OpenAPI schemas (strict), Knative and Cloud Run services the Knative Serving schema (@kubernetes-models/knative)
and their pod specs the Kubernetes PodSpec schema, KServe InferenceServices KServe's own CRD schema
(infra/validate/kserve), the in-cluster Prometheus configuration promtool, Dockerfiles hadolint.
Each validator is first shown to reject a broken copy, so a check that passes everything cannot
pass here. (Over 300 lines: one validator per file type, each with its broken copy.)
"""

from __future__ import annotations

import copy
import gzip
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.deploy.__main__ import differences, generate, main, write
from infra.deploy.plan import Plan
from tests.helpers.bundles import make_fake_bundle
from tests.helpers.procs import REPO_ROOT
from tests.infra.deploy_files import DOCKERFILES, REPO, Files, pod_specs, yaml_docs

BIN = Path(sys.executable).parent
VALIDATE_DIR = REPO_ROOT / "infra" / "validate"
KSERVE_CRD = VALIDATE_DIR / "kserve" / "serving.kserve.io_inferenceservices.yaml.gz"
K8S_VERSION = "1.33"
KNATIVE_MAX_TIMEOUT = 600  # Knative Serving's default max-revision-timeout-seconds
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
        "network-interfaces",
        "vpc-access-egress",
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


@pytest.fixture(scope="module", params=[3, 2, 4], ids=["committed-3", "generated-2", "generated-4"])
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Files:
    """The committed files (3 stages), or the generator's output for 2 or 4 stages."""
    if request.param == 3:
        return REPO
    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    write(root, generate(Plan(request.param)))
    return Files(root)


def all_docs(paths: list[Path]) -> list[dict[str, Any]]:
    return [d for f in paths for d in yaml_docs(f)]


# ---- the generator ----


def test_the_committed_files_are_the_generators_output(tmp_path: Path) -> None:
    assert differences(REPO_ROOT, generate(Plan(3))) == [], "run `python -m infra.deploy`"
    assert main(["--check"]) == 0
    copy_root = tmp_path / "copy"
    write(copy_root, generate(Plan(3)))
    (copy_root / "infra" / "k8s" / "stages.yaml").write_text("edited by hand")
    (copy_root / "infra" / "cloudrun" / "stage-9.yaml").write_text("left over from 9 stages")
    assert differences(copy_root, generate(Plan(3))) == [
        "infra/k8s/stages.yaml",
        "infra/cloudrun/stage-9.yaml (not generated)",
    ]
    assert main(["--check", "--out", str(copy_root)]) == 1
    assert main(["--out", str(copy_root)]) == 0 and differences(copy_root, generate(Plan(3))) == []


def test_the_plan_comes_from_a_bundles_manifest(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "b", stages=4)
    assert Plan.from_bundle(bundle) == Plan(4, "fake")
    assert main(["--bundle", str(bundle), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "infra" / "cloudrun" / "stage-4-gpu.yaml").is_file()
    assert main(["--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert main(["--stages", "0", "--out", str(tmp_path / "out")]) == 2


def stage_count(files: Files) -> int:
    return sum(1 for d in all_docs(files.k8s) if d["kind"] == "StatefulSet")


def test_stage_count_reaches_every_target(files: Files) -> None:
    stages = stage_count(files)
    assert stages in (2, 3, 4)
    names = {f"stage-{k}" for k in range(1, stages + 1)}
    compose = yaml.safe_load((files.root / "docker-compose.yml").read_text())["services"]
    assert names <= set(compose) and compose["export"]["environment"]["TANDEM_EXPORT_STAGES"] == str(stages)
    kinds = {"k8s": "StatefulSet", "knative": "Service", "kserve": "InferenceService"}
    for folder, kind in kinds.items():
        got = {d["metadata"]["name"] for d in all_docs(files.folder(folder)) if d["kind"] == kind}
        assert names <= got, (folder, got)
    assert {p.stem for p in files.cloudrun} >= names


# ---- compose ----


def test_compose_files_match_the_compose_specification(files: Files, tmp_path: Path) -> None:
    check = [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec"]
    broken = broken_copy(
        files.root / "docker-compose.yml", tmp_path, "condition: service_healthy", "condition: up"
    )
    assert run(*check, broken).returncode != 0
    r = run(*check, *files.compose)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed (CI installs it)"
)
def test_docker_compose_reads_each_file_as_the_readme_runs_it(files: Files) -> None:
    """`docker-compose up -d`, `docker-compose -f docker-compose.monitoring.yml up -d` (on its own,
    as the original system runs it), and each with its host-network override."""
    runs = [
        ["docker-compose.yml"],
        ["docker-compose.monitoring.yml"],
        ["docker-compose.yml", "infra/compose/host-network.yml"],
        ["docker-compose.monitoring.yml", "infra/compose/host-network.monitoring.yml"],
    ]
    for names in runs:
        args = [a for n in names for a in ("-f", n)]
        r = run("docker-compose", *args, "config", "--quiet", cwd=files.root)
        assert r.returncode == 0, f"{names}: {r.stderr}"
    r = run(
        "docker-compose",
        "-f",
        "docker-compose.monitoring.yml",
        "-f",
        "docker-compose.yml",
        "config",
        cwd=files.root,
    )
    assert r.returncode == 0 and "gateway:" in r.stdout  # both in one project: the same network


# ---- Kubernetes ----


def k8s_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}"
    return None


def kubernetes_docs(files: Files) -> list[dict[str, Any]]:
    """Every document of a built-in kind (Knative, Cloud Run and KServe resources aside)."""
    docs = all_docs(files.k8s) + all_docs(files.kserve)
    docs += [d for d in all_docs(files.knative + files.cloudrun) if d["apiVersion"] == "v1"]
    return [d for d in docs if "knative.dev" not in d["apiVersion"] and "kserve.io" not in d["apiVersion"]]


def test_kubernetes_manifests_validate_strictly(files: Files, tmp_path: Path) -> None:
    broken = broken_copy(
        files.root / "infra" / "k8s" / "stages.yaml", tmp_path, "periodSeconds: 5", "periodSecond: 5"
    )
    assert any(k8s_errors(d) for d in yaml_docs(broken))
    docs = kubernetes_docs(files)
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "StatefulSet",
        "Service",
        "Job",
        "PersistentVolumeClaim",
    } <= kinds
    assert {"Ingress", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"model-inference"}
    errors = [e for e in map(k8s_errors, docs) if e]
    assert not errors, "\n".join(errors)


def test_kubernetes_is_self_contained(files: Files) -> None:
    """What the issue asked of infra/k8s: the export in the cluster, monitoring, an Ingress for the
    UI and the API, a NetworkPolicy admitting only the gateway (and Prometheus) to the functions,
    two gateways; and the functions fetch from the store the export fills, not a placeholder."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in all_docs(files.k8s)}
    job = docs[("Job", "export")]["spec"]["template"]["spec"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == "bundles"
    store = docs[("Deployment", "bundle-store")]["spec"]["template"]["spec"]
    assert store["volumes"][0]["persistentVolumeClaim"] == {"claimName": "bundles", "readOnly": True}
    url = docs[("ConfigMap", "tandem-config")]["data"]["TANDEM_BUNDLE_URL"]
    assert url.startswith("http://bundle-store:8080/") and "YOUR-BUCKET" not in url
    assert {("Deployment", n) for n in ("prometheus", "grafana", "jaeger")} <= set(docs)
    assert docs[("Deployment", "gateway")]["spec"]["replicas"] == 2
    paths = {
        p["path"]: p["backend"]["service"]["name"]
        for p in docs[("Ingress", "tandem")]["spec"]["rules"][0]["http"]["paths"]
    }
    assert paths["/"] == "frontend" and paths["/v1"] == paths["/api"] == "gateway"
    policy = docs[("NetworkPolicy", "functions-from-gateway")]["spec"]
    assert policy["podSelector"]["matchExpressions"][0]["values"] == ["tokenizer", "stage"]
    sources = [s["podSelector"]["matchLabels"] for s in policy["ingress"][0]["from"]]
    assert sources == [{"app.kubernetes.io/component": "gateway"}, {"app.kubernetes.io/name": "prometheus"}]


def test_in_cluster_prometheus_config_passes_promtool(files: Files, tmp_path: Path) -> None:
    """Debian's promtool (the one here) is built without Kubernetes discovery, so the discovery
    block is checked for its shape and swapped for file discovery; the relabelling, the rules and
    the rest go through promtool as they are."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus; CI installs it)")
    docs = {d["metadata"]["name"]: d for d in all_docs(files.k8s) if d["kind"] == "ConfigMap"}
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in docs["prometheus-rules"]["data"].items():
        (rules / name).write_text(text)
    config = docs["prometheus"]["data"]["prometheus.yml"].replace("/etc/prometheus/rules", str(rules))
    parsed = yaml.safe_load(config)
    discovery = parsed["scrape_configs"][0].pop("kubernetes_sd_configs")
    assert discovery == [{"role": "pod", "namespaces": {"names": ["model-inference"]}}]
    parsed["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
    (tmp_path / "targets.json").write_text("[]")
    config = yaml.safe_dump(parsed)
    (tmp_path / "prometheus.yml").write_text(config)
    r = run("promtool", "check", "config", tmp_path / "prometheus.yml")
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout + r.stderr, r.stdout + r.stderr
    (tmp_path / "bad.yml").write_text(config.replace("action: keep", "action: keeep", 1))
    assert "action: keeep" in (tmp_path / "bad.yml").read_text()
    assert run("promtool", "check", "config", tmp_path / "bad.yml").returncode != 0


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


def test_knative_and_cloud_run_pod_specs_are_valid_kubernetes(files: Files, tmp_path: Path) -> None:
    stage = files.root / "infra" / "cloudrun" / "stage-1.yaml"
    assert serving_pod_errors(broken_copy(stage, tmp_path, "port: 8080}", "port: 8080, verb: GET}"))
    errors = [e for f in files.knative + files.cloudrun for e in serving_pod_errors(f)]
    assert not errors, "\n".join(errors)
    # Knative: tokenizer, N stages, gateway; Cloud Run: the same, the GPU stage, the export job
    assert sum(1 for f in files.knative + files.cloudrun for _ in pod_specs(f)) == 2 * stage_count(files) + 6


def test_serving_annotations_are_known_ones(files: Files) -> None:
    unknown = []
    for f in files.knative + files.cloudrun:
        for doc in yaml_docs(f):
            for holder in (doc.get("spec", {}).get("template", {}), doc):
                for key in (holder.get("metadata") or {}).get("annotations", {}):
                    if key not in KNOWN_ANNOTATIONS:
                        unknown.append(f"{f.name}: {key}")
    assert not unknown, unknown


def test_knative_timeouts_are_within_a_default_install(files: Files) -> None:
    timeouts = [
        d["spec"]["template"]["spec"]["timeoutSeconds"]
        for d in all_docs(files.knative)
        if d["kind"] == "Service"
    ]
    timeouts += [
        d["spec"]["predictor"]["timeout"] for d in all_docs(files.kserve) if d["kind"] == "InferenceService"
    ]
    assert timeouts and max(timeouts) <= KNATIVE_MAX_TIMEOUT, timeouts


def test_cloud_run_gateway_reaches_the_internal_functions(files: Files) -> None:
    """Internal ingress on the functions; the gateway's Direct VPC egress for all traffic, its
    service account granted the invoker role in every function's file, and its ID tokens on."""
    gateway = yaml_docs(files.root / "infra" / "cloudrun" / "gateway.yaml")[0]
    template = gateway["spec"]["template"]
    assert template["metadata"]["annotations"]["run.googleapis.com/vpc-access-egress"] == "all-traffic"
    assert "network-interfaces" in str(template["metadata"]["annotations"])
    account = template["spec"]["serviceAccountName"]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["TANDEM_GOOGLE_ID_TOKENS"] == "1"
    functions = [f for f in files.cloudrun if f.name not in ("gateway.yaml", "export-job.yaml")]
    assert len(functions) >= 4
    for f in functions:
        doc = yaml_docs(f)[0]
        assert doc["metadata"]["annotations"]["run.googleapis.com/ingress"] == "internal", f
        binding = f"add-iam-policy-binding {doc['metadata']['name']} "
        assert (
            binding in f.read_text() and f"serviceAccount:{account} --role roles/run.invoker" in f.read_text()
        ), f


@pytest.fixture(scope="module")
def knative_validator() -> Path:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node/npm not installed (CI has them)")
    r = run("npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=VALIDATE_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    return VALIDATE_DIR / "validate.mjs"


def test_knative_and_cloud_run_services_match_the_knative_schema(
    files: Files, knative_validator: Path, tmp_path: Path
) -> None:
    gateway = files.root / "infra" / "knative" / "gateway.yaml"
    broken = broken_copy(gateway, tmp_path, "timeoutSeconds: 600", 'timeoutSeconds: "ten minutes"')
    r = run("node", knative_validator, broken)
    assert r.returncode == 1 and "INVALID" in r.stdout, r.stdout + r.stderr
    r = run("node", knative_validator, *files.knative, *files.cloudrun)
    assert r.returncode == 0, r.stdout + r.stderr
    services = [d for d in all_docs(files.knative + files.cloudrun) if d["kind"] == "Service"]
    assert (
        r.stdout.count("\nvalid ") + r.stdout.startswith("valid ")
        == len(services)
        == 2 * stage_count(files) + 5
    )


# ---- KServe ----


@cache
def kserve_schema() -> dict[str, Any]:
    with gzip.open(KSERVE_CRD) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: the API server would drop them without a word."""
    if (
        isinstance(doc, dict)
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        props = schema["properties"]
        out = [f"{path}.{k}" for k in doc if k not in props]
        return out + [
            e for k, v in doc.items() if k in props for e in unknown_fields(v, props[k], f"{path}.{k}")
        ]
    if isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [
            e
            for k, v in doc.items()
            for e in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
        ]
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [e for i, v in enumerate(doc) for e in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def kserve_errors(doc: dict[str, Any]) -> list[str]:
    schema = kserve_schema()
    errors = [f"unknown field {p}" for p in unknown_fields(doc, schema)]
    errors += [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]
    return [f"InferenceService/{doc['metadata']['name']}: {e}" for e in errors]


def test_inference_services_match_kserves_crd_schema(files: Files) -> None:
    services = [d for d in all_docs(files.kserve) if d["kind"] == "InferenceService"]
    assert len(services) >= 3
    broken = copy.deepcopy(services[0])
    broken["spec"]["predictor"]["containers"][0]["prots"] = broken["spec"]["predictor"]["containers"][0].pop(
        "ports"
    )
    broken["spec"]["predictor"]["minReplicas"] = "one"
    found = kserve_errors(broken)
    assert any("unknown field .spec.predictor.containers[0].prots" in e for e in found), found
    assert any("'one' is not of type 'integer'" in e for e in found), found
    errors = [e for d in services for e in kserve_errors(d)]
    assert not errors, "\n".join(errors)
    for d in services:  # a custom predictor: OIP v2 on 8080, the bundle from storageUri at /mnt/models
        c = d["spec"]["predictor"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert c["name"] == "kserve-container" and c["ports"][0]["containerPort"] == 8080
        assert env["PROTOCOL"] == "v2" and env["STORAGE_URI"] and c["command"][-1] == "/mnt/models"


# ---- Dockerfiles ----


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    assert run(BIN / "hadolint", bad).returncode != 0
    assert len(DOCKERFILES) == 4  # serve (function, gateway, CUDA), bundle, export, frontend
    r = run(BIN / "hadolint", *DOCKERFILES)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_and_manifests_are_yaml_documents(files: Files) -> None:
    for f in files.compose + files.k8s + files.knative + files.cloudrun + files.kserve:
        assert yaml_docs(f), f"{f} has no YAML document"
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(f.read_text()) if d)
