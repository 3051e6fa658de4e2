"""infra/kserve: the stages and the tokenizer as KServe InferenceServices (custom predictors that
speak the Open Inference Protocol v2 on 8080, the bundle from storageUri at /mnt/models), the
gateway as a plain Deployment: an InferenceGraph cannot loop a sequence through the stages once
per token, nor stream."""

from __future__ import annotations

from typing import Any

from infra.deploy import kube
from infra.deploy.k8s import GENERATED
from infra.deploy.kube import AUTH_TOKEN, TRACING, env, hardened, meta, mount, pod_security, service
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

MODELS = "/mnt/models"  # where KServe's storage initializer puts what storageUri names
MAX_TIMEOUT = 600  # serverless mode runs on Knative: its default maximum request timeout


def predictor_url(name: str) -> str:
    """The predictor's cluster-local address in both of KServe's modes (a Service on port 80)."""
    return f"http://{name}-predictor.{NAMESPACE}.svc.cluster.local"


def inference_service(f: Function, plan: Plan) -> dict[str, Any]:
    stage = f.stage is not None
    environment = [
        env("STORAGE_URI", f"pvc://bundles/{plan.model}"),  # the export Job's volume (infra/k8s/export.yaml)
        env("PROTOCOL", "v2"),
        AUTH_TOKEN,
        env("PORT", str(FUNCTION_PORT)),
        env("TANDEM_VERIFY_HASHES", "1"),
    ]
    if stage:
        environment += [env("TANDEM_THREADS", "2"), env("TANDEM_KV_CACHE_BYTES", "1073741824")]
    environment += TRACING
    cpu, memory, limit = ("2", "1536Mi", "2560Mi") if stage else ("250m", "256Mi", "512Mi")
    container = {
        "name": "kserve-container",
        "image": image("function"),
        "command": FlowList([*f.command, MODELS]),
        "env": environment,
        "ports": [Flow(containerPort=FUNCTION_PORT, protocol="TCP")],
        "readinessProbe": kube.http_get("/v2/health/ready", FUNCTION_PORT, periodSeconds=5),
        "livenessProbe": kube.http_get("/v2/health/live", FUNCTION_PORT, periodSeconds=10),
        "resources": {"requests": Flow(cpu=cpu, memory=memory), "limits": Flow(memory=limit)},
        "securityContext": hardened(read_only=False),
    }
    predictor = {
        "minReplicas": 1,
        "maxReplicas": 2 if stage else 4,
        "scaleMetric": "concurrency",
        "scaleTarget": 16 if stage else 64,
        "timeout": MAX_TIMEOUT,
        "securityContext": pod_security(),
        "containers": [container],
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": meta(f.service, "stage" if stage else TOKENIZER),
        "spec": {"predictor": predictor},
    }


def inference_services(plan: Plan) -> str:
    docs = [Doc("", inference_service(f, plan)) for f in plan.functions()]
    head = f"""\
The tokenizer and every stage as KServe InferenceServices: a custom predictor (the function image,
container kserve-container, Open Inference Protocol v2 on {FUNCTION_PORT}, PROTOCOL=v2) each; KServe's
storage initializer puts the bundle STORAGE_URI names at {MODELS} before the container starts (the
export Job's volume here, infra/k8s/export.yaml; a bucket works too: gs://BUCKET/bundles/{plan.model}),
and the function checks its files against the manifest (TANDEM_VERIFY_HASHES). The gateway reaches
each at http://<name>-predictor.{NAMESPACE}.svc.cluster.local (gateway.yaml), in either of KServe's
deployment modes. Behind KServe's load balancing a stage replica may not hold a sequence: it answers
409 and the gateway replays it there, as on Knative. {GENERATED}"""
    docs[0] = Doc(head, docs[0].body)
    return dump(docs)


def gateway(plan: Plan) -> str:
    cfg = {
        "model_name": plan.model,
        "tokenizer": {"address": predictor_url(TOKENIZER)},
        "nodes": [{"id": n, "address": predictor_url(n), "model_part": k} for k, n in enumerate(plan.names)],
        "max_running": 32,
        "max_waiting": 256,
        "call_timeout": 300,
        "call_deadline_floor": 120,
        "stage_wait": 120,
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("tandem-kserve-config"),
        "data": {"config.json": gateway_json(cfg)},
    }
    container = {
        "name": GATEWAY,
        "image": image(GATEWAY),
        "command": FlowList(["python", "-m", GATEWAY, "--config", "/etc/tandem/config.json"]),
        "env": [AUTH_TOKEN, kube.API_KEYS, env("PORT", str(GATEWAY_PORT)), *TRACING],
        "ports": [Flow(name="http", containerPort=GATEWAY_PORT)],
        **kube.probes("/readyz", "/healthz"),
        "resources": {"requests": Flow(cpu="1", memory="512Mi"), "limits": Flow(memory="1Gi")},
        "securityContext": hardened(),
        "volumeMounts": [mount("config", "/etc/tandem", read_only=True)],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(GATEWAY, GATEWAY),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": Flow({kube.NAME: GATEWAY})},
            "template": {
                "metadata": {"labels": kube.labels(GATEWAY, GATEWAY)},
                "spec": {
                    "securityContext": pod_security(fs_group=False),
                    "containers": [container],
                    "volumes": [
                        kube.config_map_volume(
                            "config", "tandem-kserve-config", {"config.json": "config.json"}
                        )
                    ],
                },
            },
        },
    }
    head = f"""\
The gateway with KServe: a plain Deployment (two replicas) over the InferenceServices. KServe's
InferenceGraph is not used: it routes a request once through a fixed graph, while generation
loops every sequence through the stages once per token, with its KV cache kept per replica, and
streams. Apply infra/k8s/config.yaml (namespace) and infra/k8s/export.yaml first; the UI, the
Ingress and monitoring of infra/k8s apply unchanged. {GENERATED}"""
    return dump(
        [Doc(head, config_map), Doc("", deployment), Doc("", service(GATEWAY, GATEWAY, GATEWAY_PORT))]
    )


def files(plan: Plan) -> dict[str, str]:
    return {
        "infra/kserve/functions.yaml": inference_services(plan),
        "infra/kserve/gateway.yaml": gateway(plan),
    }
