"""infra/cloudrun: service YAMLs for `gcloud run services replace` (the functions internal-only,
the gateway public with Direct VPC egress so its calls reach them, and an ID token per call, which
the invoker role its service account is granted on each function lets through), the last stage on
an NVIDIA L4, the gateway's config.json and the export as a Cloud Run job."""

from __future__ import annotations

import json
from typing import Any

from infra.deploy.kube import env, http_get
from infra.deploy.plan import (
    CLOUD_RUN_REGISTRY,
    FUNCTION_PORT,
    GATEWAY,
    GATEWAY_PORT,
    TOKENIZER,
    Function,
    Plan,
    image,
)
from infra.deploy.yamlout import Doc, Flow, FlowList, dump, gateway_json

GATEWAY_ACCOUNT = "tandem-gateway@PROJECT.iam.gserviceaccount.com"
FUNCTION_ACCOUNT = "tandem-function@PROJECT.iam.gserviceaccount.com"
VPC = json.dumps([{"network": "default", "subnetwork": "default"}], separators=(",", ":"))
AUTH_TOKEN = {
    "name": "TANDEM_AUTH_TOKEN",
    "valueFrom": Flow(secretKeyRef=Flow(name="tandem-auth-token", key="latest")),
}
LOCATION = Flow({"cloud.googleapis.com/location": "REGION"})
PROBES = {
    # ready = session loaded and a warm-up inference run; Cloud Run sends no traffic before
    "startupProbe": http_get(
        "/v2/health/ready", FUNCTION_PORT, periodSeconds=2, timeoutSeconds=2, failureThreshold=120
    ),
    "livenessProbe": http_get("/v2/health/live", FUNCTION_PORT, periodSeconds=15, timeoutSeconds=5),
}


def url(name: str) -> str:
    return f"https://{name}-HASH-REGION.a.run.app"


def service(name: str, ingress: str, annotations: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": LOCATION,
            "annotations": Flow({"run.googleapis.com/ingress": ingress}),
        },
        "spec": {"template": {"metadata": {"annotations": annotations}, "spec": spec}},
    }


def function(f: Function, model: str, gpu: bool = False) -> dict[str, Any]:
    annotations = {
        "autoscaling.knative.dev/minScale": "0",
        "autoscaling.knative.dev/maxScale": "1" if gpu else ("4" if f.stage is None else "3"),
        # CPU stays allocated between requests: KV-cache expiry and metrics keep running
        "run.googleapis.com/cpu-throttling": "false",
        # more CPU while the instance starts: the ONNX session loads and warms up faster
        "run.googleapis.com/startup-cpu-boost": "true",
        "run.googleapis.com/execution-environment": "gen2",
    }
    if gpu:  # one L4 per instance; without zonal redundancy GPU quota is easier to get
        annotations["run.googleapis.com/gpu-zonal-redundancy-disabled"] = "true"
    environment = [AUTH_TOKEN]
    if gpu:
        environment += [env("TANDEM_PROVIDER", "cuda"), env("TANDEM_KV_CACHE_BYTES", "8589934592")]
    elif f.stage is not None:
        environment += [env("TANDEM_THREADS", "2"), env("TANDEM_KV_CACHE_BYTES", "1073741824")]
    else:
        environment += [env("TANDEM_LOG_LEVEL", "info")]
    limits = (
        Flow(cpu="4", memory="16Gi")
        if gpu
        else (Flow(cpu="2", memory="2Gi") if f.stage else Flow(cpu="1", memory="512Mi"))
    )
    if gpu:
        limits["nvidia.com/gpu"] = "1"
    container = {
        "image": image(f"function-cuda-{model}" if gpu else f"function-{model}", CLOUD_RUN_REGISTRY),
        "command": FlowList([*f.command, "/bundle"]),
        "ports": [Flow(name="http1", containerPort=FUNCTION_PORT)],
        "env": environment,
        "resources": {"limits": limits},
        **PROBES,
    }
    spec: dict[str, Any] = {
        "serviceAccountName": FUNCTION_ACCOUNT,
        "containerConcurrency": 64 if gpu else (80 if f.stage is None else 32),
        "timeoutSeconds": 900,
    }
    if gpu:
        spec["nodeSelector"] = Flow({"run.googleapis.com/accelerator": "nvidia-l4"})
    spec["containers"] = [container]
    name = f"{f.service}-gpu" if gpu else f.service
    return service(name, "internal", annotations, spec)


def function_file(f: Function, model: str, gpu: bool = False) -> str:
    name = f"{f.service}-gpu" if gpu else f.service
    what = "The tokenizer function" if f.stage is None else f"Stage {f.stage} of {model}"
    where = (
        "on an NVIDIA L4 (the CUDA image, serve.Dockerfile with ONNXRUNTIME=onnxruntime-gpu)"
        if gpu
        else "(CPU)"
    )
    head = f"""\
{what} on Cloud Run {where}; the image has the bundle baked in (infra/docker/bundle.Dockerfile).
Internal ingress: only the gateway calls it, through the VPC (the gateway's Direct VPC egress), with
an ID token of its service account, which needs the invoker role here:
  gcloud run services replace infra/cloudrun/{name}.yaml   (replace PROJECT and REGION first)
  gcloud run services add-iam-policy-binding {name} --region REGION \\
    --member serviceAccount:{GATEWAY_ACCOUNT} --role roles/run.invoker
Generated by `python -m infra.deploy`."""
    if gpu:
        head += f"\nMake it the gateway's {f.service} node in config.json to put that stage on the GPU."
    return dump([Doc(head, function(f, model, gpu))])


def gateway() -> str:
    annotations = {
        "autoscaling.knative.dev/minScale": "1",
        "autoscaling.knative.dev/maxScale": "2",
        # a client (the web UI) keeps reaching the same instance
        "run.googleapis.com/sessionAffinity": "true",
        "run.googleapis.com/cpu-throttling": "false",
        "run.googleapis.com/startup-cpu-boost": "true",
        "run.googleapis.com/execution-environment": "gen2",
        # Direct VPC egress for every call: the functions' internal ingress admits only VPC traffic
        "run.googleapis.com/network-interfaces": VPC,
        "run.googleapis.com/vpc-access-egress": "all-traffic",
    }
    container = {
        "image": image(GATEWAY, CLOUD_RUN_REGISTRY),
        "command": FlowList(["python", "-m", GATEWAY, "--config", "/etc/tandem/config.json"]),
        "ports": [Flow(name="http1", containerPort=GATEWAY_PORT)],
        "env": [
            AUTH_TOKEN,
            {
                "name": "TANDEM_API_KEYS",
                "valueFrom": Flow(secretKeyRef=Flow(name="tandem-api-keys", key="latest")),
            },
            # an ID token of the service account on every call to the functions (roles/run.invoker)
            env("TANDEM_GOOGLE_ID_TOKENS", "1"),
            env("TANDEM_CALL_TIMEOUT", "300"),
            env("TANDEM_CALL_DEADLINE_FLOOR", "120"),  # a cold start must not count as a hung replica
            env("TANDEM_STAGE_WAIT", "120"),
        ],
        "resources": {"limits": Flow(cpu="2", memory="1Gi")},
        "startupProbe": http_get(
            "/readyz", GATEWAY_PORT, periodSeconds=2, timeoutSeconds=2, failureThreshold=150
        ),
        "livenessProbe": http_get("/healthz", GATEWAY_PORT, periodSeconds=15, timeoutSeconds=5),
        "volumeMounts": [Flow(name="config", mountPath="/etc/tandem")],
    }
    spec = {
        "serviceAccountName": GATEWAY_ACCOUNT,
        "containerConcurrency": 1000,  # the gateway queues (max_waiting) and answers 429 itself
        "timeoutSeconds": 3600,  # long generations and SSE streams (Cloud Run allows up to 3600)
        "containers": [container],
        "volumes": [
            {
                "name": "config",
                "secret": {
                    "secretName": "tandem-gateway-config",
                    "items": [Flow(key="latest", path="config.json")],
                },
            }
        ],
    }
    head = f"""\
The gateway on Cloud Run, public. It runs as {GATEWAY_ACCOUNT},
sends all its traffic through the VPC (Direct VPC egress; the subnet needs Private Google Access
so the functions' run.app URLs resolve to it) and an ID token on every call (the invoker role on
each function: see their files). Its config.json (config.json here, with your URLs) is a secret:
  gcloud secrets create tandem-gateway-config --data-file infra/cloudrun/config.json
  gcloud run services replace infra/cloudrun/gateway.yaml  (replace PROJECT and REGION first)
Generated by `python -m infra.deploy`."""
    return dump([Doc(head, service(GATEWAY, "all", annotations, spec))])


def config(plan: Plan) -> str:
    return gateway_json(
        {
            "model_name": plan.model,
            "tokenizer": {"address": url(TOKENIZER)},
            "nodes": [{"id": n, "address": url(n), "model_part": k} for k, n in enumerate(plan.names)],
            "max_running": 32,
            "max_waiting": 256,
            "call_timeout": 300,
            "call_deadline_floor": 120,
            "stage_wait": 120,
        }
    )


def export_job(plan: Plan) -> str:
    container = {
        "image": image("export", CLOUD_RUN_REGISTRY),
        "command": FlowList(["python", "-m", "export.job"]),
        "env": [
            env("TANDEM_EXPORT_MODEL", plan.model),
            env("TANDEM_EXPORT_OUT", f"/bundles/{plan.model}"),
            env("TANDEM_EXPORT_STAGES", str(plan.stages)),
        ],
        "resources": {"limits": Flow(cpu="4", memory="8Gi")},
        "volumeMounts": [Flow(name="bundles", mountPath="/bundles")],
    }
    volume = {
        "name": "bundles",
        "csi": {
            "driver": "gcsfuse.run.googleapis.com",
            "volumeAttributes": {
                "bucketName": "BUCKET",
                # files owned by the image's non-root user; the export publishes the finished bundle
                # by renaming its work directory
                "mountOptions": "uid=10001,gid=10001,rename-dir-limit=100",
            },
        },
    }
    body = {
        "apiVersion": "run.googleapis.com/v1",
        "kind": "Job",
        "metadata": {"name": "tandem-export", "labels": LOCATION},
        "spec": {
            "template": {
                "metadata": {"annotations": {"run.googleapis.com/execution-environment": "gen2"}},
                "spec": {
                    "taskCount": 1,
                    "parallelism": 1,
                    "template": {
                        "spec": {
                            "maxRetries": 1,
                            "timeoutSeconds": 3600,
                            "containers": [container],
                            "volumes": [volume],
                        }
                    },
                },
            }
        },
    }
    head = """\
The export as a Cloud Run job (the export image, the only one with torch) writing the bundle to a
Cloud Storage bucket mounted with Cloud Storage FUSE (a usable bundle there is kept); the function
images then bake it in (infra/docker/bundle.Dockerfile) or fetch it (TANDEM_BUNDLE_URL).
  gcloud run jobs replace infra/cloudrun/export-job.yaml  (replace PROJECT, REGION and BUCKET first)
  gcloud run jobs execute tandem-export --wait
Generated by `python -m infra.deploy`."""
    return dump([Doc(head, body)])


def files(plan: Plan) -> dict[str, str]:
    functions = plan.functions()
    out = {f"infra/cloudrun/{f.service}.yaml": function_file(f, plan.model) for f in functions}
    last = functions[-1]
    out[f"infra/cloudrun/{last.service}-gpu.yaml"] = function_file(last, plan.model, gpu=True)
    out["infra/cloudrun/gateway.yaml"] = gateway()
    out["infra/cloudrun/config.json"] = config(plan)
    out["infra/cloudrun/export-job.yaml"] = export_job(plan)
    return out
