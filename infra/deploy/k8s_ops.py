"""infra/k8s, what makes the cluster self-contained around the serving workloads: the export Job
and the bundle store it fills, the Ingress for the UI and the API, and the NetworkPolicies
(monitoring: monitoring.py)."""

from __future__ import annotations

from typing import Any

from infra.deploy import kube, monitoring
from infra.deploy.k8s import GENERATED, STORE
from infra.deploy.kube import deployment, env, hardened, meta, mount, pod_security, service
from infra.deploy.plan import (
    FRONTEND,
    FRONTEND_PORT,
    FUNCTION_PORT,
    GATEWAY,
    GATEWAY_PORT,
    TOKENIZER,
    Plan,
    image,
)
from infra.deploy.yamlout import Doc, Flow, FlowList, dump


def export(plan: Plan) -> str:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta("bundles", "export"),
        "spec": {"accessModes": FlowList(["ReadWriteOnce"]), "resources": {"requests": Flow(storage="8Gi")}},
    }
    container = {
        "name": "export",
        "image": image("export"),
        "command": FlowList(["python", "-m", "export.job"]),
        "env": [
            env("TANDEM_EXPORT_MODEL", plan.model),
            env("TANDEM_EXPORT_OUT", f"/bundles/{plan.model}"),
            env("TANDEM_EXPORT_STAGES", str(plan.stages)),
            # offline clusters: seeded random weights of this shape instead of the hub
            env("TANDEM_EXPORT_RANDOM_INIT", ""),
        ],
        "resources": {"requests": Flow(cpu="2", memory="4Gi"), "limits": Flow(memory="8Gi")},
        "securityContext": hardened(read_only=False),
        "volumeMounts": [mount("bundles", "/bundles")],
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta("export", "export"),
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": kube.labels("export", "export")},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": pod_security(),
                    "containers": [container],
                    "volumes": [{"name": "bundles", "persistentVolumeClaim": Flow(claimName="bundles")}],
                },
            },
        },
    }
    store = {
        "name": STORE,
        "image": image("function"),
        # the standard library's file server, read-only: the functions check every file's sha256
        "command": FlowList(["python", "-m", "http.server", str(FUNCTION_PORT), "--directory", "/bundles"]),
        "ports": [Flow(name="http", containerPort=FUNCTION_PORT)],
        "readinessProbe": kube.http_get(f"/{plan.model}/manifest.json", periodSeconds=5),
        "resources": {"requests": Flow(cpu="100m", memory="64Mi"), "limits": Flow(memory="256Mi")},
        "securityContext": hardened(),
        "volumeMounts": [mount("bundles", "/bundles", read_only=True)],
    }
    pod = {
        "securityContext": pod_security(),
        "containers": [store],
        "volumes": [{"name": "bundles", "persistentVolumeClaim": Flow(claimName="bundles", readOnly=True)}],
    }
    head = f"""\
The export in the cluster: a Job runs the export image (`python -m export.job`: {plan.model} from
the hub, or TANDEM_EXPORT_RANDOM_INIT offline) into the `bundles` volume, keeping a usable bundle
already there; the bundle store serves that volume read-only to the functions, which fetch their
own files from it (TANDEM_BUNDLE_URL in config.yaml) and check each against the manifest. The
volume is ReadWriteOnce: on another node the store's pod mounts it once the Job's pod is done.
{GENERATED}"""
    return dump(
        [
            Doc(head, claim),
            Doc("", job),
            Doc("", deployment(STORE, "export", pod)),
            Doc("", service(STORE, "export", FUNCTION_PORT)),
        ]
    )


def ingress() -> str:
    def path(prefix: str, name: str, port: int) -> dict[str, Any]:
        return {
            "path": prefix,
            "pathType": "Prefix",
            "backend": {"service": {"name": name, "port": Flow(number=port)}},
        }

    api = [path(p, GATEWAY, GATEWAY_PORT) for p in ("/v1", "/api", "/docs", "/readyz", "/healthz")]
    body = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": meta(
            "tandem",
            FRONTEND,
            annotations={
                # ingress-nginx: stream server-sent events as they come, long generations
                "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                "nginx.ingress.kubernetes.io/proxy-read-timeout": "600",
            },
        ),
        "spec": {"rules": [{"http": {"paths": [*api, path("/", FRONTEND, FRONTEND_PORT)]}}]},
    }
    head = f"""\
One origin for the browser and the API clients: the API routes go to the gateway Service, the rest
to the UI (which would forward them too). The cluster's default IngressClass takes it; add
`ingressClassName` and a `host` with TLS for yours. {GENERATED}"""
    return dump([Doc(head, body)])


def network_policy() -> str:
    def policy(name: str, to: list[str], sources: list[Flow]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(name),
            "spec": {
                "podSelector": {
                    "matchExpressions": [Flow(key=kube.COMPONENT, operator="In", values=FlowList(to))]
                },
                "policyTypes": FlowList(["Ingress"]),
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": s}} for s in sources],
                        "ports": [Flow(port="http")],
                    }
                ],
            },
        }

    gateway_pods = Flow({kube.COMPONENT: GATEWAY})
    prometheus_pods = Flow({kube.NAME: "prometheus"})
    functions = policy("functions-from-gateway", [TOKENIZER, "stage"], [gateway_pods, prometheus_pods])
    store = policy(
        "bundle-store-from-functions",
        ["export"],
        [Flow({kube.COMPONENT: TOKENIZER}), Flow({kube.COMPONENT: "stage"})],
    )
    head = f"""\
Only the gateway reaches the tokenizer and the stages (and Prometheus, which scrapes /metrics on
the same port); only the functions reach the bundle store. Kubelet probes are not affected. Needs a
network plugin that enforces NetworkPolicy (Calico, Cilium, GKE Dataplane V2...). {GENERATED}"""
    return dump([Doc(head, functions), Doc("", store)])


def files(plan: Plan) -> dict[str, str]:
    return {
        "infra/k8s/export.yaml": export(plan),
        "infra/k8s/monitoring.yaml": monitoring.monitoring(),
        "infra/k8s/ingress.yaml": ingress(),
        "infra/k8s/network-policy.yaml": network_policy(),
    }
