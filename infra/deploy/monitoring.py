"""infra/k8s/monitoring.yaml: Prometheus discovering the tandem pods (the repository's rules, the
jobs and labels of the compose configuration), Grafana with the tandem dashboard and both data
sources, Jaeger receiving every workload's traces; the observability files are embedded as they
are, so a change there shows up as a difference in the generated file."""

from __future__ import annotations

from pathlib import Path

from infra.deploy import kube
from infra.deploy.k8s import GENERATED
from infra.deploy.kube import deployment, env, hardened, meta, mount, pod_security, service
from infra.deploy.yamlout import Doc, Flow, FlowList, dump

OBSERVABILITY = Path(__file__).resolve().parents[2] / "observability"


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
