"""The router: Deployment, client-facing Service and the RBAC that lets it discover engines."""

from __future__ import annotations

from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.builders import drain, pod
from splitserve.operator.spec import InferenceService
from splitserve.protocol.constants import ROUTER_HTTP_PORT

HTTP_PORT = ROUTER_HTTP_PORT
API_KEY_DIR = "/etc/splitserve/api-keys"


def router_service_name(isvc: InferenceService) -> str:
    """The client-facing Service carries the InferenceService's own name."""
    return isvc.name


def endpoint_url(isvc: InferenceService) -> str:
    port = isvc.spec.router.service_port
    host = f"{router_service_name(isvc)}.{isvc.namespace}.svc.cluster.local"
    return f"http://{host}" + ("" if port == 80 else f":{port}")


def discovery_selectors(isvc: InferenceService) -> tuple[str, str]:
    """(prefill, decode) label selectors of the engine pods and their EndpointSlices.

    Colocated pods do both jobs, so both selectors then name the decode role.
    """
    decode = L.selector_string(L.selector_labels(isvc, L.DECODE))
    if isvc.spec.colocated:
        return decode, decode
    return L.selector_string(L.selector_labels(isvc, L.PREFILL)), decode


def router_args(isvc: InferenceService) -> list[str]:
    r = isvc.spec.router
    prefill_selector, decode_selector = discovery_selectors(isvc)
    args = [
        "router",
        "--host", "0.0.0.0",
        "--port", str(HTTP_PORT),
        "--policy", r.policy,
        "--discovery", "kubernetes",
        "--namespace", isvc.namespace,
        "--prefill-selector", prefill_selector,
        "--decode-selector", decode_selector,
    ]  # fmt: skip
    # The served name first (what responses report), then the aliases clients may also send.
    for name in isvc.spec.model.names:
        args += ["--served-name", name]
    args += ["--log-format", isvc.spec.observability.log_format]
    args += ["--drain-seconds", str(isvc.spec.drain_seconds)]
    if isvc.spec.scale_from_zero:
        # A pool may have no pods: hold requests while one starts (the operator scales up on
        # the held count); the router stays ready meanwhile.
        args += ["--cold-start-timeout", str(r.cold_start_timeout_seconds)]
    if r.api_key_secret is not None:
        args += ["--api-key-file", f"{API_KEY_DIR}/{r.api_key_secret.key}"]
    return args


# Readiness: /health answers 503 until some engine generation can serve, so a router with no
# engines takes no traffic. Liveness must not ask that (a router waiting for its engines is
# alive; killing it would not bring them): /metrics answers 200 whenever the event loop runs.
READINESS_PATH = "/health"
LIVENESS_PATH = "/metrics"


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def build_router_deployment(isvc: InferenceService) -> dict[str, Any]:
    r = isvc.spec.router
    labels = L.role_labels(isvc, L.ROUTER)
    mounts = pod.scratch_mounts()
    volumes = pod.scratch_volumes()
    if r.api_key_secret is not None:
        secret = r.api_key_secret
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": secret.name,
                    "items": [{"key": secret.key, "path": secret.key}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "api-keys", "mountPath": API_KEY_DIR, "readOnly": True})
    container = {
        "name": "router",
        **pod.image_fields(isvc),
        "args": router_args(isvc),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": pod.base_env() + pod.observability_env(isvc, L.ROUTER),
        "resources": {k: dict(v) for k, v in r.pool.resources.items()},
        "readinessProbe": _http_probe(READINESS_PATH, period=5, failures=2),
        "livenessProbe": _http_probe(LIVENESS_PATH, period=10, failures=3),
        **drain.lifecycle(isvc),
        "securityContext": pod.container_security_context(),
        # A crash's last output lines become the container's termination message, which the
        # operator reports in the Degraded condition (kubectl describe shows it too).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    container, volumes = pod.with_pool_extras(r.pool, container, volumes)
    annotations = pod.prometheus_annotations(isvc, HTTP_PORT)
    template = {
        "metadata": pod.pod_metadata(r.pool, labels, annotations),
        "spec": {
            "serviceAccountName": L.child_name(isvc, L.ROUTER),
            "automountServiceAccountToken": True,  # it watches EndpointSlices
            "securityContext": pod.pod_security_context(),
            "terminationGracePeriodSeconds": drain.termination_grace_seconds(isvc),
            **pod.pull_secrets(isvc),
            **pod.scheduling(r.pool, L.selector_labels(isvc, L.ROUTER)),
            "containers": [container],
            "volumes": volumes,
        },
    }
    meta = L.metadata(isvc, L.child_name(isvc, L.ROUTER), labels)
    return pod.deployment(isvc, meta, r.pool.replicas, L.selector_labels(isvc, L.ROUTER), template)


def build_router_service(isvc: InferenceService) -> dict[str, Any]:
    r = isvc.spec.router
    labels = L.ownership_labels(isvc) | {
        "app.kubernetes.io/component": L.ROUTER,
        L.ROLE_LABEL: L.ROUTER,
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": L.metadata(
            isvc, router_service_name(isvc), labels, dict(r.service_annotations) or None
        ),
        "spec": {
            "type": r.service_type,
            "selector": L.selector_labels(isvc, L.ROUTER),
            "ports": [
                {"name": "http", "port": r.service_port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def build_router_rbac(isvc: InferenceService) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding: read-only discovery of this namespace's engines.

    EndpointSlices give the ready engine addresses; pods give their rollout-hash labels,
    which the router uses to pair only compatible prefill and decode pods.
    """
    name = L.child_name(isvc, L.ROUTER)
    labels = L.ownership_labels(isvc)
    read = ["get", "list", "watch"]
    annotations = dict(isvc.spec.router.pool.overrides.service_account_annotations) or None
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": L.metadata(isvc, name, labels, annotations),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": L.metadata(isvc, name, labels),
            "rules": [
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": L.metadata(isvc, name, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": isvc.namespace}],
        },
    ]
