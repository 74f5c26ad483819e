"""Names, labels, selectors and owner references shared by every builder.

Selectors use only the stable labels (instance and role): a Deployment's selector is immutable,
so anything that changes during a rollout (model, rollout hash) is a plain label.
"""

from __future__ import annotations

import re
from typing import Any

from splitserve.operator import crd
from splitserve.operator.spec import InferenceService, short_hash
from splitserve.protocol.labels import (  # noqa: F401 - the operator's names for them
    APPLIED_HASH_ANNOTATION,
    CONFIG_CHECKSUM_ANNOTATION,
    DECODE,
    ENGINE_ROLES,
    INSTANCE_LABEL,
    MODEL_LABEL,
    PREFILL,
    PREFIX,
    ROLE_LABEL,
    ROLLOUT_HASH_LABEL,
    ROUTER,
)

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "splitserve-operator"
FIELD_MANAGER = "splitserve-operator"
# The operator's own pods (chart and kustomize base): the engines let them ask for status.
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "splitserve-operator"}


def child_name(isvc: InferenceService, suffix: str) -> str:
    return f"{isvc.name}-{suffix}"


def label_value(text: str) -> str:
    """``text`` as a valid label value (63 characters, alphanumerics and -_.), hashed if cut."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", ".", text).strip("._-")
    if len(clean) <= 63:
        return clean
    return clean[:50].rstrip("._-") + "-" + short_hash(text)


def ownership_labels(isvc: InferenceService) -> dict[str, str]:
    """Labels on every child; the reconciler lists children by these to prune stale ones."""
    return {
        "app.kubernetes.io/name": "splitserve",
        "app.kubernetes.io/instance": isvc.name,
        MANAGED_BY_LABEL: MANAGED_BY,
        "app.kubernetes.io/part-of": "splitserve",
        INSTANCE_LABEL: isvc.name,
    }


def selector_labels(isvc: InferenceService, role: str) -> dict[str, str]:
    """The immutable Deployment/Service selector of one role."""
    return {INSTANCE_LABEL: isvc.name, ROLE_LABEL: role}


def role_labels(isvc: InferenceService, role: str) -> dict[str, str]:
    """Labels of a role's objects and pods: ownership, component and role.

    Engine pods add the model and rollout hash (`engine_labels`); the router's pods do not,
    so a new generation of engines never restarts the router that pairs them.
    """
    return ownership_labels(isvc) | {"app.kubernetes.io/component": role, ROLE_LABEL: role}


def engine_labels(isvc: InferenceService, role: str) -> dict[str, str]:
    """Labels of an engine Deployment and its pods: the role's plus model and rollout hash."""
    return role_labels(isvc, role) | {
        MODEL_LABEL: label_value(isvc.spec.model.uri.split("://", 1)[1]),
        ROLLOUT_HASH_LABEL: isvc.spec.rollout_hash,
    }


def generation_selector(isvc: InferenceService, role: str) -> dict[str, str]:
    """The selector of one generation's engine Deployment: role and rollout hash, so two
    generations' Deployments never adopt each other's pods."""
    return selector_labels(isvc, role) | {ROLLOUT_HASH_LABEL: isvc.spec.rollout_hash}


def engine_deployment_name(isvc: InferenceService, role: str) -> str:
    """`NAME-ROLE-HASH`: one Deployment per role and generation (rollout hash)."""
    return f"{isvc.name}-{role}-{isvc.spec.rollout_hash}"


def selector_string(labels: dict[str, str]) -> str:
    """A label selector in the ``k=v,k=v`` form the router's command line takes."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def owner_reference(isvc: InferenceService) -> dict[str, Any]:
    """Every child is controlled by its InferenceService, so deleting it collects them."""
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "name": isvc.name,
        "uid": isvc.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    isvc: InferenceService,
    name: str,
    labels: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Child metadata: name, namespace, labels, owner reference (and annotations if any)."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": isvc.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner_reference(isvc)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta
