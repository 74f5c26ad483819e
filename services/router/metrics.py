"""The router's Prometheus metrics, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitserve_router_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "splitserve_router_request_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "splitserve_router_time_to_first_token_seconds",
            "Time from request arrival to the first streamed token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "splitserve_router_inflight_requests", "Requests in progress", registry=r
        )
        self.routed = Counter(
            "splitserve_router_routed",
            "Samples routed, by pod and role",
            ["pod", "role"],
            registry=r,
        )
        self.matched_tokens = Counter(
            "splitserve_router_prefix_matched_tokens",
            "Prompt tokens the chosen pod was expected to hold in its prefix cache",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "splitserve_router_prompt_tokens", "Prompt tokens routed", registry=r
        )
        self.cached_tokens = Counter(
            "splitserve_router_cached_tokens",
            "Prompt tokens the engines reported served from a prefix cache",
            registry=r,
        )
        self.generation_tokens = Counter(
            "splitserve_router_generation_tokens", "Generated tokens", registry=r
        )
        self.routing_decisions = Counter(
            "splitserve_router_routing_decisions",
            "Routing decisions by policy, serving mode (disaggregated / colocated) and whether "
            "the chosen pod was expected to hold part of the prompt (prefix hit / miss)",
            ["policy", "mode", "prefix"],
            registry=r,
        )
        self.queue = Histogram(
            "splitserve_router_queue_seconds",
            "Arrival at the router to the request's dispatch to the engines (body, template, "
            "tokenization, waiting for a worker thread)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "splitserve_router_retries", "Samples retried on another pod", registry=r
        )
        self.aborts = Counter(
            "splitserve_router_client_aborts", "Requests whose client went away", registry=r
        )
        self.prefix_index_blocks = Gauge(
            "splitserve_router_prefix_index_blocks",
            "Block hashes in the prefix index: from KV events (precise) or routing (speculative)",
            ["kind"],
            registry=r,
        )
        self.ready_pods = Gauge(
            "splitserve_router_ready_pods", "Ready pods by role", ["role"], registry=r
        )
        self.cold_start_waiting = Gauge(
            "splitserve_router_cold_start_waiting",
            "Requests held because no pod of the model is ready (scale from zero); the "
            "operator scales up on it",
            registry=r,
        )
        self.cold_start_requests = Counter(
            "splitserve_router_cold_start_requests",
            "Requests that had to wait for a pod to start, by outcome (served, timeout, "
            "rejected: the queue was full, cancelled: the client left)",
            ["outcome"],
            registry=r,
        )
