"""`splitserve router`: the OpenAI-compatible front door over prefill and decode pools.

Local mode: ``--prefill-endpoints``, ``--decode-endpoints`` and/or ``--colocated-endpoints``.
In a cluster (as the operator runs it): ``--discovery kubernetes --namespace NS
--prefill-selector SEL --decode-selector SEL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI

from splitserve.observability.logs import LOG_FORMATS, setup_logging
from splitserve.observability.tracing import setup_tracing
from splitserve.protocol.constants import API_KEYS_ENV
from splitserve.services.router import http_server
from splitserve.services.router.app import AppConfig, build_app
from splitserve.services.router.auth import ApiKeys, parse_keys
from splitserve.services.router.cold_start import ColdStartConfig, ColdStartQueue
from splitserve.services.router.discovery import (
    KubeAccess,
    KubernetesDiscovery,
    parse_addresses,
    static_endpoints,
)
from splitserve.services.router.dispatch import Dispatcher
from splitserve.services.router.guard import Limits
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.model_facts import ModelCatalog
from splitserve.services.router.policy import POLICIES, Weights
from splitserve.services.router.pool import Pool
from splitserve.services.router.prefix_index import PrefixIndex
from splitserve.services.router.protocol import DEFAULT_MAX_TEMPERATURE
from splitserve.services.router.retry import RetryBudget, RetryConfig
from splitserve.services.router.serving import OpenAIServing

log = logging.getLogger("splitserve.router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-name",
        action="append",
        default=None,
        help="model name clients send (repeatable; default: the names the engines report)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None,
        help="cap the context length below the engines' own (default: theirs)",
    )  # fmt: skip
    p.add_argument("--instance-id", default="", help="reported by /health (launchers check it)")
    g = p.add_argument_group("discovery")
    g.add_argument("--discovery", choices=("static", "kubernetes"), default="static")
    g.add_argument("--prefill-endpoints", default="", help="host:port,... of prefill pods")
    g.add_argument("--decode-endpoints", default="", help="host:port,... of decode pods")
    g.add_argument("--colocated-endpoints", default="", help="host:port,... of pods doing both")
    g.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    g.add_argument("--prefill-selector", default="")
    g.add_argument("--decode-selector", default="")
    g.add_argument("--kube-api-server", default=None, help="API server URL (default: in-cluster)")
    r = p.add_argument_group("routing")
    r.add_argument("--policy", choices=POLICIES, default="prefix")
    r.add_argument("--prefix-weight", type=float, default=Weights.prefix)
    r.add_argument("--load-weight", type=float, default=Weights.load)
    r.add_argument("--load-capacity", type=float, default=Weights.capacity,
                   help="queue depth at which a pod counts as fully loaded")  # fmt: skip
    r.add_argument("--session-header", default="x-session-id")
    r.add_argument("--no-kv-events", action="store_true", help="approximate prefix index only")
    r.add_argument("--speculative-ttl", type=float, default=10.0,
                   help="seconds a routed (not yet reported) prefix counts as cached")  # fmt: skip
    r.add_argument("--stats-interval", type=float, default=0.5)
    r.add_argument("--retry-max-attempts", type=int, default=RetryConfig.max_attempts)
    r.add_argument("--retry-ratio", type=float, default=RetryConfig.ratio)
    r.add_argument("--prefill-timeout", type=float, default=120.0)
    r.add_argument(
        "--cold-start-timeout", type=float, default=0.0,
        help="hold a request up to this long while no pod of the model is ready (scale from "
        "zero), then 503; 0: 503 at once",
    )  # fmt: skip
    r.add_argument("--cold-start-max-waiting", type=int, default=ColdStartConfig.max_waiting,
                   help="requests held at most; more get 503 at once")  # fmt: skip
    r.add_argument(
        "--transition-timeout", type=float, default=ColdStartConfig.transition_s,
        help="hold a request up to this long while no pod pair is ready but pods are changing "
        "over (some pod draining: a rollout, a scale-down); 0: 503 at once",
    )  # fmt: skip
    r.add_argument(
        "--drain-seconds", type=float, default=30.0,
        help="on SIGTERM, stop accepting connections and let requests in flight (streams) "
        "finish for up to this long",
    )  # fmt: skip
    a = p.add_argument_group("API")
    # Keys never go on a command line (every user of the machine sees it in ps): a file or
    # $SPLITSERVE_API_KEYS. The old flag is still parsed so that it can be refused by name.
    a.add_argument("--api-key", action="append", default=[], help=argparse.SUPPRESS)
    a.add_argument("--api-key-file", default=None,
                   help=f"file with accepted keys, one per line, re-read when it changes (or "
                   f"${API_KEYS_ENV}=k1,k2)")  # fmt: skip
    a.add_argument("--max-body-bytes", type=int, default=8 << 20)
    a.add_argument(
        "--max-temperature", type=float, default=DEFAULT_MAX_TEMPERATURE,
        help="highest temperature accepted (OpenAI: 2; up to the engine's 100, as vLLM allows)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text, or JSON lines (request id and role on each); the access log "
                   "(logger splitserve.access) is on at INFO")  # fmt: skip


@dataclass(frozen=True)
class RouterSettings:
    """Everything `build_router` needs, independent of argparse (tests build it directly)."""

    served_names: tuple[str, ...] = ()  # empty: the names the engines report
    policy: str = "prefix"
    weights: Weights = Weights()
    retry: RetryConfig = RetryConfig()
    api_keys: ApiKeys | frozenset[str] = frozenset()
    max_body_bytes: int = 8 << 20
    max_temperature: float = DEFAULT_MAX_TEMPERATURE
    max_model_len: int | None = None
    session_header: str = "x-session-id"
    use_kv_events: bool = True
    speculative_ttl_s: float = 10.0
    stats_interval_s: float = 0.5
    prefill_timeout_s: float = 120.0
    instance_id: str = ""
    cold_start: ColdStartConfig = ColdStartConfig()


def read_api_keys(key_file: str | None, env: str | None) -> ApiKeys:
    """Keys from the environment, plus a (re-read) key file."""
    return ApiKeys(parse_keys(env or ""), key_file)


def build_router(
    settings: RouterSettings, start_discovery: Callable[[Pool], Awaitable[None]]
) -> FastAPI:
    """The app with its pool, dispatcher and metrics; discovery starts with the app's lifespan.

    The router needs no model: each engine pod tells it its tokenizer and limits (GetInfo).
    """
    metrics = RouterMetrics()
    index = PrefixIndex(speculative_ttl_s=settings.speculative_ttl_s)
    catalog = ModelCatalog()

    # Pool and dispatcher need the running loop (asyncio.Event, tasks): built in the lifespan.
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = Pool(index, catalog, stats_interval_s=settings.stats_interval_s,
                    use_kv_events=settings.use_kv_events,
                    on_info=serving.adapters.reconcile)  # fmt: skip
        dispatcher.pool = pool
        task = asyncio.create_task(start_discovery(pool))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pool.close()

    dispatcher = Dispatcher(
        _PlaceholderPool(index),  # replaced in the lifespan
        policy=settings.policy,
        weights=settings.weights,
        budget=RetryBudget(settings.retry),
        prefill_timeout_s=settings.prefill_timeout_s,
        metrics=metrics,
    )
    serving = OpenAIServing(
        catalog,
        dispatcher,
        metrics,
        max_model_len=settings.max_model_len,
        cold_start=ColdStartQueue(settings.cold_start, metrics),
    )
    config = AppConfig(
        served_names=settings.served_names,
        instance_id=settings.instance_id,
        api_keys=settings.api_keys
        if isinstance(settings.api_keys, ApiKeys)
        else ApiKeys(settings.api_keys),
        max_body_bytes=settings.max_body_bytes,
        session_header=settings.session_header,
        max_temperature=settings.max_temperature,
    )
    app = build_app(config, serving, dispatcher, metrics)
    app.router.lifespan_context = lifespan
    app.state.dispatcher = dispatcher
    app.state.metrics = metrics
    return app


class _PlaceholderPool:
    """Stands in until the lifespan builds the real pool: no pods, so requests get 503."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self.pods: dict = {}

    def ready(self, role: str) -> list:
        return []


def static_discovery(prefill: list[str], decode: list[str], colocated: list[str]):
    endpoints = static_endpoints(prefill, decode, colocated)

    async def start(pool: Pool) -> None:
        pool.set_endpoints(endpoints)
        await asyncio.Event().wait()

    return start


def kubernetes_discovery(args: argparse.Namespace):
    async def start(pool: Pool) -> None:
        access = KubeAccess.detect(args.kube_api_server)
        disco = KubernetesDiscovery(
            access, args.namespace, args.prefill_selector, args.decode_selector, pool.set_endpoints
        )
        await disco.run()

    return start


def run(args: argparse.Namespace) -> int:
    if args.api_key:
        raise SystemExit(
            "router: --api-key would show the key to every user of this machine (ps): put the "
            f"keys in a file (--api-key-file PATH, one per line) or in ${API_KEYS_ENV}=k1,k2"
        )
    setup_logging(args.log_level, args.log_format, "router", args.instance_id or None)
    setup_tracing("router", args.instance_id or None)
    if args.discovery == "static":
        prefill = parse_addresses(args.prefill_endpoints)
        decode = parse_addresses(args.decode_endpoints)
        colocated = parse_addresses(args.colocated_endpoints)
        if not colocated and not (prefill and decode):
            raise SystemExit(
                "router: give --colocated-endpoints, or both --prefill-endpoints and "
                "--decode-endpoints (or --discovery kubernetes)"
            )
        start = static_discovery(prefill, decode, colocated)
    else:
        if not args.prefill_selector or not args.decode_selector:
            raise SystemExit("router: --discovery kubernetes needs both selectors")
        start = kubernetes_discovery(args)
    names = tuple(args.served_name or ())
    settings = RouterSettings(
        served_names=names,
        policy=args.policy,
        weights=Weights(
            prefix=args.prefix_weight, load=args.load_weight, capacity=args.load_capacity
        ),
        retry=RetryConfig(max_attempts=args.retry_max_attempts, ratio=args.retry_ratio),
        api_keys=read_api_keys(args.api_key_file, os.environ.get(API_KEYS_ENV)),
        max_body_bytes=args.max_body_bytes,
        max_temperature=args.max_temperature,
        max_model_len=args.max_model_len,
        session_header=args.session_header.lower(),
        use_kv_events=not args.no_kv_events,
        speculative_ttl_s=args.speculative_ttl,
        stats_interval_s=args.stats_interval,
        prefill_timeout_s=args.prefill_timeout,
        instance_id=args.instance_id,
        cold_start=ColdStartConfig(
            args.cold_start_timeout, args.cold_start_max_waiting, args.transition_timeout
        ),
    )
    app = build_router(settings, start)
    log.info(
        "router on http://%s:%d serving %s (policy %s)", args.host, args.port,
        names or "the engines' model", args.policy,
    )  # fmt: skip
    http_server.serve(
        app,
        args.host,
        args.port,
        Limits(max_body_bytes=args.max_body_bytes),
        drain_seconds=args.drain_seconds,
    )
    return 0
