"""Prometheus metrics of KV transfers and leases.

Created per server object against a registry passed in (never import-time globals), so two servers
in one test process do not collide. Two families: ``splitserve:kv_*`` (both directions, every
transport, leases) and the names vLLM's NIXL connector exports (``vllm:nixl_*``), recorded at the
reading side for every pull whichever transport moved it (label ``transport``), so dashboards
built for vLLM's P/D deployments work unchanged.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's NIXL connector buckets: transfer time, and bytes from 2 KiB to 8 GiB
_NIXL_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
_NIXL_BYTES = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))
_NIXL_DESCRIPTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
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
        self.nixl_xfer_time = Histogram(
            "vllm:nixl_xfer_time_seconds",
            "Duration of one KV pull (the prompt's missing blocks), at the reading side.",
            ["transport"],
            buckets=_NIXL_SECONDS,
            registry=r,
        )
        self.nixl_bytes = Histogram(
            "vllm:nixl_bytes_transferred",
            "Bytes moved by one KV pull, at the reading side.",
            ["transport"],
            buckets=_NIXL_BYTES,
            registry=r,
        )
        self.nixl_descriptors = Histogram(
            "vllm:nixl_num_descriptors",
            "Transfer descriptors (one per KV block: blocks are contiguous) in one KV pull.",
            ["transport"],
            buckets=_NIXL_DESCRIPTORS,
            registry=r,
        )
        self.nixl_failed = Counter(
            "vllm:nixl_num_failed_transfers",
            "KV pulls that failed, at the reading side.",
            ["transport"],
            registry=r,
        )
        self.nixl_expired = Counter(
            "vllm:nixl_num_kv_expired_reqs",
            "Requests whose held KV expired before the reader released it (prefill side).",
            registry=r,
        )

    def record_transfer(self, transport: str, direction: str, nbytes: int, nblocks: int) -> None:
        self.bytes.labels(transport, direction).inc(nbytes)
        self.blocks.labels(transport, direction).inc(nblocks)

    def record_pull(self, transport: str, nbytes: int, nblocks: int, seconds: float) -> None:
        """One successful pull at the reading side."""
        self.record_transfer(transport, "received", nbytes, nblocks)
        self.seconds.labels(transport).observe(seconds)
        self.nixl_xfer_time.labels(transport).observe(seconds)
        self.nixl_bytes.labels(transport).observe(nbytes)
        self.nixl_descriptors.labels(transport).observe(nblocks)

    def record_failure(self, transport: str, reason: str) -> None:
        """One failed pull at the reading side."""
        self.failures.labels(transport, reason).inc()
        self.nixl_failed.labels(transport).inc()

    def record_expired(self) -> None:
        self.leases_expired.inc()
        self.nixl_expired.inc()
