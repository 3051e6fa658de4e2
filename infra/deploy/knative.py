"""infra/knative: a Knative Service per function (cluster-local, each scaling on its own, to zero
when idle) and one for the gateway, with timeouts a default Knative install accepts (its
max-revision-timeout-seconds is 600)."""

from __future__ import annotations

from typing import Any

from infra.deploy.k8s import GENERATED
from infra.deploy.kube import API_KEYS, AUTH_TOKEN, env, http_get, meta
from infra.deploy.plan import (
    FUNCTION_PORT,
    GATEWAY,
    GATEWAY_PORT,
    NAMESPACE,
    TOKENIZER,
    Function,
    Plan,
    image,
)
from infra.deploy.yamlout import Doc, Flow, FlowList, dump, gateway_json

MAX_TIMEOUT = 600  # Knative Serving's default max-revision-timeout-seconds
KSVC = "serving.knative.dev/v1"


def url(name: str) -> str:
    return f"http://{name}.{NAMESPACE}.svc.cluster.local"


def config(plan: Plan) -> str:
    cfg = {
        "model_name": plan.model,
        "tokenizer": {"address": url(TOKENIZER)},
        "nodes": [{"id": n, "address": url(n), "model_part": k} for k, n in enumerate(plan.names)],
        "max_running": 32,
        "max_waiting": 256,
        "call_timeout": 300,
        "call_deadline_floor": 120,
        "stage_wait": 120,
    }
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("tandem-config"),
        "data": {"config.json": gateway_json(cfg)},
    }
    head = f"""\
kubectl apply -f infra/knative/config.yaml, then the Services in this folder.
The gateway reaches each function through its Knative Service URL (cluster-local): Knative's
activator and load balancing pick the pod, so a stage scaled out (or back from zero) may not hold
a sequence's KV cache; it answers 409 and the gateway replays that sequence's inputs there.
{GENERATED}"""
    return dump([Doc(head, namespace), Doc("", config_map)])


def knative_service(
    name: str, annotations: dict[str, str], spec: dict[str, Any], visibility: bool
) -> dict[str, Any]:
    metadata = meta(name)
    if visibility:
        metadata["labels"] = Flow({"networking.knative.dev/visibility": "cluster-local"})
    return {
        "apiVersion": KSVC,
        "kind": "Service",
        "metadata": metadata,
        "spec": {"template": {"metadata": {"annotations": annotations}, "spec": spec}},
    }


def function(f: Function, model: str) -> dict[str, Any]:
    stage = f.stage is not None
    annotations = {
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/max-scale": "4",
        "autoscaling.knative.dev/target": "16" if stage else "64",
        # keep a pod (and its KV caches) a while after the last request before scaling down
        "autoscaling.knative.dev/scale-down-delay": "5m",
    }
    environment = [AUTH_TOKEN]
    environment += (
        [env("TANDEM_THREADS", "2"), env("TANDEM_KV_CACHE_BYTES", "1073741824")]
        if stage
        else [env("TANDEM_LOG_LEVEL", "info")]
    )
    cpu, memory = ("2", "2Gi") if stage else ("1", "512Mi")
    container = {
        "image": image(f"function-{model}"),
        "command": FlowList([*f.command, "/bundle"]),
        "ports": [Flow(containerPort=FUNCTION_PORT)],
        "env": environment,
        "readinessProbe": http_get("/v2/health/ready", None, periodSeconds=1),
        "livenessProbe": http_get("/v2/health/live", None, periodSeconds=10),
        "resources": {"requests": Flow(cpu=cpu, memory=memory), "limits": Flow(cpu=cpu, memory=memory)},
    }
    spec = {
        "containerConcurrency": 32 if stage else 128,
        "timeoutSeconds": MAX_TIMEOUT,
        "containers": [container],
    }
    return knative_service(f.service, annotations, spec, visibility=True)


def functions(plan: Plan) -> str:
    docs = [Doc("", function(f, plan.model)) for f in plan.functions()]
    head = f"""\
The tokenizer and stage functions as Knative Services. Image: the function image with the bundle
baked in (infra/docker/bundle.Dockerfile), so a pod from zero only loads its session.
timeoutSeconds {MAX_TIMEOUT}: a default install's maximum (max-revision-timeout-seconds). {GENERATED}"""
    docs[0] = Doc(head, docs[0].body)
    return dump(docs)


def gateway(plan: Plan) -> str:
    container = {
        "image": image(GATEWAY),
        "command": FlowList(["python", "-m", GATEWAY, "--config", "/etc/tandem/config.json"]),
        "ports": [Flow(containerPort=GATEWAY_PORT)],
        "env": [
            AUTH_TOKEN,
            API_KEYS,
            env("TANDEM_MAX_RUNNING", "32"),
            env("TANDEM_CALL_TIMEOUT", "300"),
            env("TANDEM_CALL_DEADLINE_FLOOR", "120"),  # a cold start must not count as a hung replica
            env("TANDEM_REQUEST_TIMEOUT", str(MAX_TIMEOUT - 10)),  # the gateway's 504 before Knative's cut
        ],
        "readinessProbe": http_get("/readyz", None, periodSeconds=2),
        "livenessProbe": http_get("/healthz", None, periodSeconds=10),
        "resources": {"requests": Flow(cpu="1", memory="512Mi"), "limits": Flow(cpu="2", memory="1Gi")},
        "volumeMounts": [Flow(name="config", mountPath="/etc/tandem", readOnly=True)],
    }
    spec = {
        # the gateway queues (max_waiting) and answers 429 itself; let every request reach it
        "containerConcurrency": 0,
        "timeoutSeconds": MAX_TIMEOUT,
        "containers": [container],
        "volumes": [
            {
                "name": "config",
                "configMap": {
                    "name": "tandem-config",
                    "items": [Flow(key="config.json", path="config.json")],
                },
            }
        ],
    }
    annotations = {"autoscaling.knative.dev/min-scale": "0", "autoscaling.knative.dev/max-scale": "2"}
    head = f"""\
The gateway as a Knative Service: public, up to two pods (each batches its own requests over the
same stages), scaled to zero with them when idle. Its health checks reach the stages through their
Knative URLs, which keeps them warm while it runs; a cold request wakes every stage at once (the
gateway is ready when they are). timeoutSeconds {MAX_TIMEOUT} is a default install's maximum: a
generation or SSE stream longer than that is cut, so the gateway answers 504 just before
(TANDEM_REQUEST_TIMEOUT); raise max-revision-timeout-seconds in config-defaults for longer ones.
{GENERATED}"""
    return dump([Doc(head, knative_service(GATEWAY, annotations, spec, visibility=False))])


def files(plan: Plan) -> dict[str, str]:
    return {
        "infra/knative/config.yaml": config(plan),
        "infra/knative/functions.yaml": functions(plan),
        "infra/knative/gateway.yaml": gateway(plan),
    }
