"""Engine discovery Services, NetworkPolicy and PodDisruptionBudgets."""

from __future__ import annotations

from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.autoscale.controller import managed_roles
from splitserve.operator.builders.engine import GRPC_PORT, METRICS_PORT
from splitserve.operator.spec import InferenceService


def _role_object_labels(isvc: InferenceService, role: str) -> dict[str, str]:
    # No model/hash labels here: EndpointSlices copy a Service's labels and the router selects
    # them by instance and role, which never change during a rollout.
    return L.ownership_labels(isvc) | {"app.kubernetes.io/component": role, L.ROLE_LABEL: role}


def build_headless_service(isvc: InferenceService, role: str) -> dict[str, Any]:
    """A headless Service per engine role: its EndpointSlices list the ready pods' addresses."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": L.metadata(isvc, L.child_name(isvc, role), _role_object_labels(isvc, role)),
        "spec": {
            "clusterIP": "None",
            "selector": L.selector_labels(isvc, role),
            "publishNotReadyAddresses": False,
            "ports": [
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {
                    "name": "metrics",
                    "port": METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
            ],
        },
    }


def build_engine_network_policy(isvc: InferenceService) -> dict[str, Any]:
    """Engine pods accept traffic only from this service's router and from each other.

    Router -> engines on the gRPC port only; the operator on the gRPC port with LoRA on (it
    asks which adapters each pod has loaded, for status) and on the metrics port with
    autoscaling (its autoscaler scrapes them). Engine <-> engine on any port: the NIXL (UCX)
    transport opens its own ports. The peers of ``observability.metrics.allowFrom`` (the
    monitoring namespace) reach the metrics port, and nothing else.
    """
    engines = {
        "matchLabels": {L.INSTANCE_LABEL: isvc.name},
        "matchExpressions": [
            {"key": L.ROLE_LABEL, "operator": "In", "values": list(L.ENGINE_ROLES)}
        ],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": L.metadata(isvc, L.child_name(isvc, "engines"), L.ownership_labels(isvc)),
        "spec": {
            "podSelector": engines,
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": L.selector_labels(isvc, L.ROUTER)}}],
                    "ports": [{"protocol": "TCP", "port": GRPC_PORT}],
                },
                {"from": [{"podSelector": engines}]},
                *_operator_ingress(isvc),
                *_metrics_rules(isvc),
            ],
        },
    }


def _metrics_rules(isvc: InferenceService) -> list[dict[str, Any]]:
    peers = isvc.spec.observability.metrics.allow_from
    if not peers:
        return []
    port = {"protocol": "TCP", "port": METRICS_PORT}
    return [{"from": [dict(p) for p in peers], "ports": [port]}]


def _operator_ingress(isvc: InferenceService) -> list[dict[str, Any]]:
    """The operator's pods (any namespace) may reach the engines: with LoRA on, their gRPC port
    (which adapters each pod has loaded, for status.adapters); with autoscaling, their metrics
    port (the autoscaler scrapes it)."""
    ports = []
    if isvc.spec.lora_enabled:
        ports.append({"protocol": "TCP", "port": GRPC_PORT})
    if managed_roles(isvc):
        ports.append({"protocol": "TCP", "port": METRICS_PORT})
    if not ports:
        return []
    source = {"namespaceSelector": {}, "podSelector": {"matchLabels": L.OPERATOR_POD_LABELS}}
    return [{"from": [source], "ports": ports}]


def build_pdb(isvc: InferenceService, role: str) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take at most one pod of a role at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": L.metadata(isvc, L.child_name(isvc, role), _role_object_labels(isvc, role)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": L.selector_labels(isvc, role)},
        },
    }
