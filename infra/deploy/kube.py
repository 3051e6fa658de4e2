"""Pieces every Kubernetes-shaped file shares (plain Kubernetes, Knative, KServe, Cloud Run): labels
and metadata, environment entries, probes, the hardened security context, volumes of a ConfigMap."""

from __future__ import annotations

from typing import Any

from infra.deploy.plan import NAMESPACE, OTLP_ENDPOINT, PART_OF
from infra.deploy.yamlout import Flow, FlowList

NON_ROOT = 10001  # every image's user
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"


def labels(name: str, component: str) -> Flow:
    return Flow({NAME: name, COMPONENT: component, "app.kubernetes.io/part-of": PART_OF})


def meta(name: str, component: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if component:
        out["labels"] = labels(name, component)
    return out | extra


def env(name: str, value: str) -> Flow:
    return Flow(name=name, value=value)


def secret_env(name: str, key: str, secret: str = "tandem-auth", optional: bool = True) -> dict[str, Any]:
    ref = Flow(name=secret, key=key, optional=True) if optional else Flow(name=secret, key=key)
    return {"name": name, "valueFrom": Flow(secretKeyRef=ref)}


def config_env(name: str, config_map: str = "tandem-config") -> dict[str, Any]:
    return {"name": name, "valueFrom": Flow(configMapKeyRef=Flow(name=config_map, key=name))}


AUTH_TOKEN = secret_env("TANDEM_AUTH_TOKEN", "token")  # functions.auth; unset = open
API_KEYS = secret_env("TANDEM_API_KEYS", "api-keys")  # the client keys the gateway accepts
TRACING = [env("OTEL_EXPORTER_OTLP_ENDPOINT", OTLP_ENDPOINT)]


def http_get(path: str, port: int | str | None = "http", **more: Any) -> dict[str, Any]:
    get = Flow(path=path) if port is None else Flow(path=path, port=port)
    return {"httpGet": get, **more}


def probes(ready: str, live: str, port: int | str | None = "http", startup: int = 300) -> dict[str, Any]:
    """Startup and readiness on the ready route (200 only once the model is loaded and warmed up),
    liveness on the live route, so a slow load never gets a pod killed."""
    out: dict[str, Any] = {}
    if startup:
        out["startupProbe"] = http_get(ready, port, periodSeconds=2, failureThreshold=startup)
    out["readinessProbe"] = http_get(ready, port, periodSeconds=5)
    out["livenessProbe"] = http_get(live, port, periodSeconds=10, failureThreshold=3)
    return out


def hardened(read_only: bool = True) -> dict[str, Any]:
    ctx: dict[str, Any] = {"allowPrivilegeEscalation": False}
    if read_only:
        ctx["readOnlyRootFilesystem"] = True
    ctx["capabilities"] = Flow(drop=FlowList(["ALL"]))
    return ctx


def pod_security(fs_group: bool = True) -> Flow:
    ctx = Flow(runAsNonRoot=True, runAsUser=NON_ROOT, runAsGroup=NON_ROOT)
    if fs_group:
        ctx["fsGroup"] = NON_ROOT
    return ctx


def config_map_volume(name: str, config_map: str, items: dict[str, str] | None = None) -> dict[str, Any]:
    """A volume of a ConfigMap's keys (items: key -> path inside the volume)."""
    source: dict[str, Any] = {"name": config_map}
    if items:
        source["items"] = [Flow(key=k, path=p) for k, p in items.items()]
    return {"name": name, "configMap": source}


def mount(name: str, path: str, read_only: bool = False) -> Flow:
    return Flow(name=name, mountPath=path, readOnly=True) if read_only else Flow(name=name, mountPath=path)


def service(
    name: str, component: str, port: int, *, headless: bool = False, target: str = "http"
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if headless:
        spec["clusterIP"] = "None"
    spec["selector"] = Flow({NAME: name})
    spec["ports"] = [Flow(name="http", port=port, targetPort=target)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, component), "spec": spec}


def deployment(name: str, component: str, pod: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": Flow({NAME: name})},
            "template": {"metadata": {"labels": labels(name, component)}, "spec": pod},
        },
    }
