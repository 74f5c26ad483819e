"""Prometheus metrics of KV transfers and leases.

Created per server object against a registry passed in (never import-time globals), so two servers
in one test process do not collide. Names follow vLLM's ``prefix:name`` style; vLLM has no
standard names for KV-transfer metrics, so these are ``splitserve:kv_*``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class TransferMetrics:
    """The transfer metrics of one process, registered once into ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.bytes = Counter(
            "splitserve:kv_transfer_bytes",
            "KV-block bytes moved, by transport and direction (sent by the source, received by "
            "the sink).",
            ["transport", "direction"],
            registry=r,
        )
        self.blocks = Counter(
            "splitserve:kv_transfer_blocks",
            "KV blocks moved, by transport and direction.",
            ["transport", "direction"],
            registry=r,
        )
        self.seconds = Histogram(
            "splitserve:kv_transfer_seconds",
            "Wall time of one KV pull at the sink, handshake excluded.",
            ["transport"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "splitserve:kv_transfer_failures",
            "Failed KV transfers, by transport and KVTransferError reason.",
            ["transport", "reason"],
            registry=r,
        )
        self.leases_granted = Counter(
            "splitserve:kv_leases_granted", "KV leases granted to hand-offs.", registry=r
        )
        self.leases_released = Counter(
            "splitserve:kv_leases_released", "KV leases released by the reader.", registry=r
        )
        self.leases_expired = Counter(
            "splitserve:kv_leases_expired",
            "KV leases that expired before release (their blocks were freed).",
            registry=r,
        )
        self.leases_active = Gauge(
            "splitserve:kv_leases_active", "KV leases currently held.", registry=r
        )

    def record_transfer(self, transport: str, direction: str, nbytes: int, nblocks: int) -> None:
        self.bytes.labels(transport, direction).inc(nbytes)
        self.blocks.labels(transport, direction).inc(nblocks)

    def record_failure(self, transport: str, reason: str) -> None:
        self.failures.labels(transport, reason).inc()
