"""The typed InferenceService spec: frozen dataclasses parsed from a custom resource.

`parse()` is the only way in: it validates against the CRD schema, fills the schema's defaults,
then checks what a schema cannot express (flags the operator owns, rollout limits, quantities).
A spec that fails raises `SpecError` before any object is built, so a bad spec is never
half-applied; the reconciler reports it in status instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.performance_mode import mode_settings
from splitserve.operator import crd
from splitserve.operator.autoscale import config as autoscale
from splitserve.operator.autoscale.config import JointPolicy, RoleAutoscaling
from splitserve.operator.crd import FieldError
from splitserve.operator.model_source import (
    DOWNLOAD_SCHEMES,
    ModelCache,
    ModelSource,
    default_names,
)
from splitserve.operator.pod_overrides import (
    RESERVED_MOUNT_PATHS,
    PodOverrides,
    Reserved,
    override_errors,
    parse_overrides,
)

__all__ = [
    "InferenceService", "InferenceServiceSpec", "ModelCache", "ModelSource", "PodOverrides",
    "PoolSpec", "SpecError", "parse", "short_hash",
]  # fmt: skip

# Flags the operator sets on every engine/router pod; extraArgs must not fight over them.
MANAGED_FLAGS = frozenset(
    {
        "--model", "--revision", "--served-name", "--dtype", "--quantization", "--block-size",
        "--max-model-len", "--max-num-seqs", "--performance-mode", "--host", "--port",
        "--metrics-port", "--kv-transport",
        "--lease-seconds", "--kv-failure-policy", "--colocated", "--drain-seconds",
        "--enable-lora", "--lora-modules", "--lora-modules-file", "--max-loras", "--max-lora-rank",
    }
)  # fmt: skip
# Children are named <name>-<suffix>; the longest suffix plus a Deployment's pod hash must keep
# Service names (DNS-1035 labels, 63 characters) valid.
MAX_NAME_LENGTH = 40
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
DEFAULT_ENGINE_REQUESTS = {"cpu": "1", "memory": "4Gi"}
DEFAULT_ROUTER_REQUESTS = {"cpu": "250m", "memory": "256Mi"}


class SpecError(ValueError):
    """The custom resource is invalid; ``errors`` name each offending field."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass(frozen=True)
class EngineSpec:
    """Engine settings shared by prefill and decode; part of the config checksum."""

    dtype: str
    block_size: int
    max_model_len: int
    max_num_seqs: int | None  # None: the performance mode's, else the engine's default
    extra_args: tuple[str, ...]
    performance_mode: str | None = None  # --performance-mode (docs/performance.md)
    lora: LoRASpec = field(default_factory=lambda: LoRASpec())
    # none | int8 | w8a8 | gguf (engine --quantization); None: the performance mode's, else none
    quantization: str | None = None

    @property
    def effective_quantization(self) -> str:
        """The scheme the engines run: the explicit one, else the performance mode's (what
        ``performance_mode.resolve`` picks for a CPU engine), else "none"."""
        if self.quantization is not None:
            return self.quantization
        return mode_settings(self.performance_mode).quantization or "none"


@dataclass(frozen=True)
class LoRASpec:
    """LoRA serving limits (engine settings: changing them rolls the engine pods)."""

    enabled: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter of ``spec.adapters``: loaded by every engine pod at run time."""

    name: str
    uri: str

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def pvc_claim(self) -> str | None:
        """The PVC to mount read-only at /adapters/<claim>, for pvc:// adapters."""
        return self.uri[len("pvc://") :].split("/", 1)[0] if self.scheme == "pvc" else None

    @property
    def engine_path(self) -> str:
        """Where the engine reads it: a path in the pod, or ``hf://org/name``."""
        rest = self.uri.split("://", 1)[1]
        if self.scheme == "pvc":
            claim, path = rest.split("/", 1)
            return f"/adapters/{claim}/{path}"
        return self.uri if self.scheme == "hf" else rest


@dataclass(frozen=True)
class PoolSpec:
    """Placement and size of one Deployment (prefill, decode or router)."""

    replicas: int
    resources: Mapping[str, Any]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any]
    autoscaling: RoleAutoscaling | None = None  # prefill and decode only
    overrides: PodOverrides = PodOverrides()  # env, volumes, scheduling and metadata extras


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class RouterSpec:
    pool: PoolSpec
    policy: str
    service_type: str
    service_port: int
    service_annotations: Mapping[str, str]
    api_key_secret: SecretKeyRef | None
    cold_start_timeout_seconds: int = 300  # holding requests while a pool is scaled to zero


@dataclass(frozen=True)
class KvTransferSpec:
    transport: str
    failure_policy: str
    lease_seconds: int


@dataclass(frozen=True)
class RolloutSpec:
    """Deployment RollingUpdate limits, applied to every pool."""

    max_surge: int | str
    max_unavailable: int | str


@dataclass(frozen=True)
class TracingSpec:
    """OpenTelemetry export of every pod's spans (the standard ``OTEL_*`` variables)."""

    endpoint: str
    protocol: str = "grpc"
    sampling_ratio: float = 1.0


@dataclass(frozen=True)
class MetricsSpec:
    """How Prometheus finds and reaches every pod's /metrics."""

    # prometheus.io/scrape, port and path on every pod (annotation-based discovery)
    prometheus_annotations: bool = True
    # NetworkPolicy peers (e.g. the monitoring namespace) admitted to the engines' metrics port
    allow_from: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class ObservabilitySpec:
    log_format: str = "text"
    tracing: TracingSpec | None = None  # None: no traces
    metrics: MetricsSpec = MetricsSpec()


@dataclass(frozen=True)
class InferenceServiceSpec:
    model: ModelSource
    image: str
    image_pull_policy: str
    image_pull_secrets: tuple[str, ...]
    engine: EngineSpec
    prefill: PoolSpec
    decode: PoolSpec
    router: RouterSpec
    kv_transfer: KvTransferSpec
    rollout: RolloutSpec
    observability: ObservabilitySpec = ObservabilitySpec()
    drain_seconds: int = 60  # a stopping pod's time to finish its work (streams, KV leases)
    autoscaling: JointPolicy = JointPolicy()  # how prefill's size follows decode's
    adapters: tuple[AdapterSpec, ...] = ()

    @property
    def lora_enabled(self) -> bool:
        return self.engine.lora.enabled or bool(self.adapters)

    @property
    def colocated(self) -> bool:
        """No prefill pool: each decode pod runs prefill and decode in one engine.

        An autoscaled prefill pool at zero pods is scaled to zero, not colocated (a spec with
        prefill.autoscaling must have prefill.replicas >= 1).
        """
        return self.prefill.replicas == 0 and self.prefill.autoscaling is None

    @property
    def scale_from_zero(self) -> bool:
        """Some pool may have no pods: the router then holds requests while one starts."""
        return any(
            pool.autoscaling is not None and pool.autoscaling.min_replicas == 0
            for pool in (self.prefill, self.decode)
        ) or (self.decode.replicas == 0)

    @property
    def rollout_hash(self) -> str:
        """One version of the serving stack: what a rollout moves every engine pod to together.

        Model, revision, image (the engine code), dtype, quantization (the effective one: a
        performance mode that quantizes changes the KV the engines write), block size and KV
        transport. Pods carry it as a label; the router pairs only pods with equal labels (and,
        independently, equal KV compatibility hashes reported by the engines themselves), so no
        request crosses versions during a rollout.
        """
        key = {
            "model": self.model.uri,
            "revision": self.model.revision,
            "image": self.image,
            "dtype": self.engine.dtype,
            "blockSize": self.engine.block_size,
            "transport": self.kv_transfer.transport,
        }
        quantization = self.engine.effective_quantization
        if quantization != "none":  # absent when off: existing hashes stay as they are
            key["quantization"] = quantization
        return short_hash(key)


@dataclass(frozen=True)
class InferenceService:
    """An InferenceService's identity plus its parsed spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: InferenceServiceSpec
    labels: Mapping[str, str] = field(default_factory=dict)


def short_hash(value: Any, length: int = 12) -> str:
    """A stable short hex digest of a JSON-serialisable value (key order does not matter)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def parse(obj: Mapping[str, Any], *, default_namespace: str = "default") -> InferenceService:
    """Validate, default and type an InferenceService object. Raises `SpecError`."""
    errors = crd.validate(dict(obj))
    if errors:
        raise SpecError(errors)
    body = crd.apply_defaults(dict(obj))
    meta = body.get("metadata") or {}
    errors = _semantic_errors(meta, body["spec"])
    if errors:
        raise SpecError(errors)
    return InferenceService(
        name=meta["name"],
        namespace=meta.get("namespace") or default_namespace,
        uid=meta.get("uid") or "00000000-0000-0000-0000-000000000000",
        generation=int(meta.get("generation") or 1),
        labels=dict(meta.get("labels") or {}),
        spec=_spec(body["spec"]),
    )


def _spec(s: dict[str, Any]) -> InferenceServiceSpec:
    model, engine, router, kv = s["model"], s["engine"], s["router"], s["kvTransfer"]
    secret = router.get("apiKeySecret")
    return InferenceServiceSpec(
        model=_model(model),
        image=s["image"],
        image_pull_policy=s["imagePullPolicy"],
        image_pull_secrets=tuple(ref["name"] for ref in s.get("imagePullSecrets", [])),
        engine=EngineSpec(
            dtype=engine["dtype"],
            block_size=engine["blockSize"],
            max_model_len=engine["maxModelLen"],
            max_num_seqs=engine.get("maxNumSeqs"),
            extra_args=tuple(engine["extraArgs"]),
            performance_mode=engine.get("performanceMode"),
            quantization=engine.get("quantization"),
            lora=LoRASpec(
                enabled=bool(engine["lora"]["enabled"]),
                max_loras=engine["lora"]["maxLoras"],
                max_lora_rank=engine["lora"]["maxLoraRank"],
            ),
        ),
        prefill=_pool(s["prefill"], DEFAULT_ENGINE_REQUESTS),
        decode=_pool(s["decode"], DEFAULT_ENGINE_REQUESTS),
        drain_seconds=s.get("drainSeconds", 60),
        autoscaling=autoscale.parse_joint(s.get("autoscaling")),
        router=RouterSpec(
            pool=_pool(router, DEFAULT_ROUTER_REQUESTS),
            policy=router["policy"],
            service_type=router["service"]["type"],
            service_port=router["service"]["port"],
            service_annotations=dict(router["service"].get("annotations", {})),
            api_key_secret=SecretKeyRef(secret["name"], secret["key"]) if secret else None,
            cold_start_timeout_seconds=router.get("coldStartTimeoutSeconds", 300),
        ),
        kv_transfer=KvTransferSpec(kv["transport"], kv["failurePolicy"], kv["leaseSeconds"]),
        rollout=RolloutSpec(s["rollout"]["maxSurge"], s["rollout"]["maxUnavailable"]),
        observability=_observability(s.get("observability") or {}),
        adapters=tuple(AdapterSpec(a["name"], a["uri"]) for a in s.get("adapters") or ()),
    )


def _model(m: dict[str, Any]) -> ModelSource:
    served, aliases = default_names(m["uri"])
    if m.get("servedName"):
        served, aliases = m["servedName"], ()
    cache = m.get("cache") or {}
    return ModelSource(
        uri=m["uri"],
        revision=m.get("revision", ""),
        served_name=served,
        aliases=tuple(aliases) + tuple(m.get("aliases") or ()),
        credentials_secret=(m.get("credentials") or {}).get("secretName", ""),
        endpoint=m.get("endpoint", ""),
        cache=ModelCache(cache.get("claimName", ""), cache.get("hostPath", "")),
    )


def _observability(o: dict[str, Any]) -> ObservabilitySpec:
    t = o.get("tracing") or {}
    tracing = None
    if t.get("endpoint"):
        tracing = TracingSpec(
            t["endpoint"], t.get("protocol", "grpc"), float(t.get("samplingRatio", 1.0))
        )
    m = o.get("metrics") or {}
    metrics = MetricsSpec(
        prometheus_annotations=m.get("prometheusAnnotations", True),
        allow_from=tuple(dict(peer) for peer in m.get("allowFrom") or ()),
    )
    return ObservabilitySpec(o.get("logFormat", "text"), tracing, metrics)


def _pool(p: dict[str, Any], default_requests: dict[str, str]) -> PoolSpec:
    resources = {k: dict(v) for k, v in (p.get("resources") or {}).items()}
    # Every pod gets cpu/memory requests (the scheduler and PDBs depend on them).
    resources["requests"] = default_requests | resources.get("requests", {})
    return PoolSpec(
        replicas=p["replicas"],
        resources=resources,
        node_selector=dict(p.get("nodeSelector", {})),
        tolerations=tuple(dict(t) for t in p.get("tolerations", [])),
        affinity=dict(p.get("affinity", {})),
        autoscaling=autoscale.parse_role(p.get("autoscaling")),
        overrides=parse_overrides(p),
    )


def _semantic_errors(meta: Mapping[str, Any], s: dict[str, Any]) -> list[FieldError]:
    errors: list[FieldError] = []
    name = str(meta.get("name") or "")
    if not _DNS1035.match(name) or len(name) > MAX_NAME_LENGTH:
        errors.append(
            FieldError(
                "metadata.name",
                f"must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters, got {name!r}",
            )
        )
    engine = s["engine"]
    if engine["maxModelLen"] < engine["blockSize"]:
        errors.append(FieldError("spec.engine.maxModelLen", "must be at least blockSize"))
    for i, arg in enumerate(engine["extraArgs"]):
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            errors.append(
                FieldError(f"spec.engine.extraArgs[{i}]", f"{flag} is set by the operator")
            )
    served = s["model"].get("servedName") or s["model"]["uri"].rstrip("/").rsplit("/", 1)[-1]
    seen: set[str] = set()
    for i, adapter in enumerate(s.get("adapters") or ()):
        if adapter["name"] in seen:
            errors.append(FieldError(f"spec.adapters[{i}].name", f"{adapter['name']!r} repeats"))
        if adapter["name"] == served:
            errors.append(FieldError(f"spec.adapters[{i}].name", "is the model's served name"))
        seen.add(adapter["name"])
    rollout = s["rollout"]
    for key in ("maxSurge", "maxUnavailable"):
        value = rollout[key]
        if isinstance(value, int) and value < 0:
            errors.append(FieldError(f"spec.rollout.{key}", "must not be negative"))
        if isinstance(value, str) and int(value[:-1]) > 100:
            errors.append(FieldError(f"spec.rollout.{key}", "must be at most 100%"))
    if _is_zero(rollout["maxSurge"]) and _is_zero(rollout["maxUnavailable"]):
        errors.append(
            FieldError("spec.rollout", "maxSurge and maxUnavailable must not both be zero")
        )
    errors += autoscale.semantic_errors(s)
    for role in ("prefill", "decode", "router"):
        for kind, quantities in (s[role].get("resources") or {}).items():
            for resource, quantity in quantities.items():
                if not _QUANTITY.match(str(quantity)):
                    errors.append(
                        FieldError(
                            f"spec.{role}.resources.{kind}.{resource}",
                            f"{quantity!r} is not a Kubernetes quantity",
                        )
                    )
    errors += _model_errors(s["model"])
    errors += _override_errors(s)
    return errors


def _model_errors(m: dict[str, Any]) -> list[FieldError]:
    """Download settings belong to the sources that download (hf://, s3://)."""
    errors: list[FieldError] = []
    scheme = m["uri"].split("://", 1)[0]
    if scheme not in DOWNLOAD_SCHEMES:
        for key in ("credentials", "endpoint", "cache"):
            if m.get(key):
                errors.append(
                    FieldError(
                        f"spec.model.{key}", f"applies to hf:// and s3:// models, not {scheme}://"
                    )
                )
    cache = m.get("cache") or {}
    if cache.get("claimName") and cache.get("hostPath"):
        errors.append(FieldError("spec.model.cache", "give claimName or hostPath, not both"))
    return errors


def _override_errors(s: dict[str, Any]) -> list[FieldError]:
    """Pass-through fields that would replace the operator's own volumes, paths or labels."""
    errors: list[FieldError] = []
    model = _model(s["model"])
    paths = RESERVED_MOUNT_PATHS
    if model.pvc_claim:
        paths = paths | {f"/models/{model.pvc_claim}"}
    roles = (
        ("decode", "router") if s["prefill"]["replicas"] == 0 else ("prefill", "decode", "router")
    )
    overrides = {role: parse_overrides(s[role]) for role in roles}
    for role, o in overrides.items():
        errors += override_errors(role, o, Reserved(mount_paths=paths))
        if role != "router" and not _QUANTITY.match(o.shm_size):
            errors.append(
                FieldError(f"spec.{role}.shmSize", f"{o.shm_size!r} is not a Kubernetes quantity")
            )
    # prefill and decode pods share one ServiceAccount (NAME-engine): their annotations merge.
    if "prefill" in overrides:
        theirs = overrides["decode"].service_account_annotations
        for key, value in overrides["prefill"].service_account_annotations.items():
            if key in theirs and theirs[key] != value:
                errors.append(
                    FieldError(
                        f"spec.prefill.serviceAccount.annotations.{key}",
                        "differs from spec.decode's: both roles share the engine ServiceAccount",
                    )
                )
    return errors


def _is_zero(value: int | str) -> bool:
    return value in (0, "0%")
