"""The engine-settings ConfigMap and its checksum.

The checksum goes on both engine pod templates, so a change of engine settings rolls prefill and
decode together, and a change of anything else (replicas, resources, router) leaves it alone.
"""

from __future__ import annotations

import json
from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.spec import InferenceService, short_hash

ENGINE_CONFIG_KEY = "engine.json"
ENGINE_CONFIG_MOUNT = "/etc/splitserve/engine"


def engine_settings(isvc: InferenceService) -> dict[str, Any]:
    """Everything both engine roles must agree on, as one JSON-ready dict."""
    s = isvc.spec
    return {
        "model": s.model.uri,
        "revision": s.model.revision,
        "servedName": s.model.served_name,
        "dtype": s.engine.dtype,
        "quantization": s.engine.quantization,
        "blockSize": s.engine.block_size,
        "maxModelLen": s.engine.max_model_len,
        "maxNumSeqs": s.engine.max_num_seqs,
        "extraArgs": list(s.engine.extra_args),
        "kvTransport": s.kv_transfer.transport,
        "kvFailurePolicy": s.kv_transfer.failure_policy,
        "leaseSeconds": s.kv_transfer.lease_seconds,
        "colocated": s.colocated,
        # LoRA limits only: the adapters themselves come and go without a restart
        "lora": {
            "enabled": s.lora_enabled,
            "maxLoras": s.engine.lora.max_loras,
            "maxLoraRank": s.engine.lora.max_lora_rank,
        },
    }


def config_data(isvc: InferenceService) -> dict[str, str]:
    return {ENGINE_CONFIG_KEY: json.dumps(engine_settings(isvc), indent=2, sort_keys=True) + "\n"}


def config_checksum(isvc: InferenceService) -> str:
    """Changes exactly when the engine settings (the ConfigMap's data) change."""
    return short_hash(config_data(isvc), length=16)


def config_map_name(isvc: InferenceService) -> str:
    return L.child_name(isvc, "engine")


def build_config_map(isvc: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": L.metadata(isvc, config_map_name(isvc), L.ownership_labels(isvc)),
        "data": config_data(isvc),
    }
