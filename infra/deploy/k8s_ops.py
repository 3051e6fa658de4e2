"""infra/k8s, what makes the cluster self-contained around the serving workloads: the export Job
and the bundle store it fills, Prometheus (pod discovery, the repository's rules), Grafana (the
tandem dashboard) and Jaeger, the Ingress for the UI and the API, and the NetworkPolicies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra.deploy import kube
from infra.deploy.k8s import GENERATED, STORE
from infra.deploy.kube import env, hardened, meta, mount, pod_security, service
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

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "observability"


def deployment(name: str, component: str, pod: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": Flow({kube.NAME: name})},
            "template": {"metadata": {"labels": kube.labels(name, component)}, "spec": pod},
        },
    }


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


PROMETHEUS_K8S = """\
# Prometheus in the cluster: every tandem pod's `http` port, found through the Kubernetes API.
# Jobs and labels as in observability/prometheus/prometheus.yml (gateway, tokenizer, stages with
# stage and replica), so the same rules and dashboard apply.
global:
  scrape_interval: 15s
  evaluation_interval: 15s
rule_files:
  - /etc/prometheus/rules/*.yml
scrape_configs:
  - job_name: tandem
    kubernetes_sd_configs:
      - role: pod
        namespaces: {names: [model-inference]}
    relabel_configs:
      - {source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component], regex: gateway|tokenizer|stage, action: keep}
      - {source_labels: [__meta_kubernetes_pod_container_port_name], regex: http, action: keep}
      - {source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component], target_label: job}
      - {source_labels: [job], regex: stage, target_label: job, replacement: stages}
      - {source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_label_app_kubernetes_io_name], regex: stage;(.+), target_label: stage}
      - {source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_name], regex: stage;(.+), target_label: replica}
"""


def prometheus() -> list[Doc]:
    rules = {p.name: p.read_text() for p in sorted((OBSERVABILITY / "prometheus" / "rules").glob("*.yml"))}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("prometheus", "monitoring")}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta("prometheus", "monitoring"),
        "rules": [
            {
                "apiGroups": FlowList([""]),
                "resources": FlowList(["pods"]),
                "verbs": FlowList(["get", "list", "watch"]),
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta("prometheus", "monitoring"),
        "roleRef": Flow(apiGroup="rbac.authorization.k8s.io", kind="Role", name="prometheus"),
        "subjects": [Flow(kind="ServiceAccount", name="prometheus")],
    }
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("prometheus", "monitoring")}
    cm["data"] = {"prometheus.yml": PROMETHEUS_K8S}
    rules_cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("prometheus-rules", "monitoring"),
        "data": rules,
    }
    container = {
        "name": "prometheus",
        "image": "prom/prometheus:v2.42.0",
        "args": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
        "ports": [Flow(name="web", containerPort=9090)],
        "readinessProbe": kube.http_get("/-/ready", "web", periodSeconds=10),
        "resources": {"requests": Flow(cpu="250m", memory="512Mi"), "limits": Flow(memory="2Gi")},
        "securityContext": hardened(),
        "volumeMounts": [
            mount("config", "/etc/prometheus", read_only=True),
            mount("rules", "/etc/prometheus/rules", read_only=True),
            mount("data", "/prometheus"),
        ],
    }
    pod = {
        "serviceAccountName": "prometheus",
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [
            kube.config_map_volume("config", "prometheus"),
            kube.config_map_volume("rules", "prometheus-rules"),
            {"name": "data", "emptyDir": Flow(sizeLimit="10Gi")},
        ],
    }
    head = "Prometheus: discovers the tandem pods (Role: list/watch pods in this namespace), loads the repository's rules."
    return [
        Doc(head, account),
        Doc("", role),
        Doc("", binding),
        Doc("", cm),
        Doc("", rules_cm),
        Doc("", deployment("prometheus", "monitoring", pod)),
        Doc("", service("prometheus", "monitoring", 9090, target="web")),
    ]


def grafana() -> list[Doc]:
    provisioning = OBSERVABILITY / "grafana" / "provisioning"
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("grafana-provisioning", "monitoring")}
    cm["data"] = {f"{p.parent.name}.yml": p.read_text() for p in sorted(provisioning.glob("*/*.yml"))}
    dashboards = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("grafana-dashboards", "monitoring"),
    }
    dashboards["data"] = {
        p.name: p.read_text() for p in sorted((OBSERVABILITY / "grafana" / "dashboards").glob("*.json"))
    }
    container = {
        "name": "grafana",
        "image": "grafana/grafana-oss:11.3.0",
        "env": [
            env("GF_SECURITY_ADMIN_USER", "admin"),
            kube.secret_env("GF_SECURITY_ADMIN_PASSWORD", "admin-password", secret="grafana"),
            env("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "/var/lib/grafana/dashboards/tandem.json"),
        ],
        "ports": [Flow(name="web", containerPort=3000)],
        "readinessProbe": kube.http_get("/api/health", "web", periodSeconds=10),
        "resources": {"requests": Flow(cpu="100m", memory="128Mi"), "limits": Flow(memory="512Mi")},
        "securityContext": hardened(read_only=False),
        "volumeMounts": [
            mount("provisioning", "/etc/grafana/provisioning", read_only=True),
            mount("dashboards", "/var/lib/grafana/dashboards", read_only=True),
        ],
    }
    items = {
        f"{p.parent.name}.yml": f"{p.parent.name}/{p.name}" for p in sorted(provisioning.glob("*/*.yml"))
    }
    pod = {
        "securityContext": Flow(
            runAsNonRoot=True, runAsUser=472, runAsGroup=472, fsGroup=472
        ),  # the image's user
        "containers": [container],
        "volumes": [
            kube.config_map_volume("provisioning", "grafana-provisioning", items),
            kube.config_map_volume("dashboards", "grafana-dashboards"),
        ],
    }
    head = """\
Grafana with the tandem dashboard (observability/grafana) and the Prometheus and Jaeger data
sources. Its admin password comes from the Secret `grafana` (without it: admin/admin, as in compose):
  kubectl -n model-inference create secret generic grafana --from-literal=admin-password=..."""
    return [
        Doc(head, cm),
        Doc("", dashboards),
        Doc("", deployment("grafana", "monitoring", pod)),
        Doc("", service("grafana", "monitoring", 3000, target="web")),
    ]


def jaeger() -> list[Doc]:
    ports = [("ui", 16686), ("otlp-http", 4318), ("otlp-grpc", 4317)]
    container = {
        "name": "jaeger",
        "image": "jaegertracing/all-in-one:1.62.0",
        "env": [env("COLLECTOR_OTLP_ENABLED", "true")],
        "ports": [Flow(name=n, containerPort=p) for n, p in ports],
        "readinessProbe": kube.http_get("/", "ui", periodSeconds=10),
        "resources": {"requests": Flow(cpu="100m", memory="256Mi"), "limits": Flow(memory="1Gi")},
        "securityContext": hardened(),
    }
    pod = {"securityContext": pod_security(fs_group=False), "containers": [container]}
    svc = service("jaeger", "monitoring", 16686, target="ui")
    svc["spec"]["ports"] = [Flow(name=n, port=p, targetPort=n) for n, p in ports]
    head = "Jaeger all-in-one (in memory): every workload sends OTLP/HTTP to http://jaeger:4318; UI on 16686."
    return [Doc(head, deployment("jaeger", "monitoring", pod)), Doc("", svc)]


def monitoring() -> str:
    docs = [*prometheus(), *grafana(), *jaeger()]
    docs[0] = Doc(f"{docs[0].comment}\n{GENERATED}", docs[0].body)
    return dump(docs)


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
        "infra/k8s/monitoring.yaml": monitoring(),
        "infra/k8s/ingress.yaml": ingress(),
        "infra/k8s/network-policy.yaml": network_policy(),
    }
