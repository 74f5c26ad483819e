"""Kubernetes label and annotation keys: the operator writes them, the router reads them."""

from __future__ import annotations

PREFIX = "serving.splitserve.io"
INSTANCE_LABEL = f"{PREFIX}/inferenceservice"
ROLE_LABEL = f"{PREFIX}/role"
MODEL_LABEL = f"{PREFIX}/model"
# The operator's digest of one version of the stack (InferenceServiceSpec.rollout_hash); the
# router never pairs a prefill and a decode pod whose labels differ.
ROLLOUT_HASH_LABEL = f"{PREFIX}/rollout-hash"
CONFIG_CHECKSUM_ANNOTATION = f"{PREFIX}/config-checksum"
APPLIED_HASH_ANNOTATION = f"{PREFIX}/applied-hash"

# The named container port the engines serve gRPC on (EndpointSlices carry it by name).
GRPC_PORT_NAME = "grpc"

PREFILL, DECODE, ROUTER = "prefill", "decode", "router"
ENGINE_ROLES = (PREFILL, DECODE)
