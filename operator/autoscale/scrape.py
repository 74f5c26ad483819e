"""Reading the pods' ``/metrics`` for one autoscaling pass (the only I/O of the autoscaler
besides the Kubernetes API).

The operator scrapes ready pods directly, as Prometheus would: engine pods on their port named
``metrics``, router pods on ``http``, all at once with a short timeout. A pod that does not
answer, or answers garbage, is left out of the pass (the decision then rests on the others, or
holds). Pods being deleted are left out too: their load is on its way elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from splitserve.operator import labels as L
from splitserve.operator.autoscale.controller import Observation
from splitserve.operator.autoscale.metrics import parse_engine, parse_router

log = logging.getLogger(__name__)

PORT_NAMES = {L.PREFILL: "metrics", L.DECODE: "metrics", L.ROUTER: "http"}
TIMEOUT_S = 3.0


def metrics_url(pod: Mapping[str, Any]) -> str | None:
    """``http://IP:PORT/metrics`` of a ready, running pod of a known role; None otherwise."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    role = (meta.get("labels") or {}).get(L.ROLE_LABEL)
    if role not in PORT_NAMES or meta.get("deletionTimestamp") or not status.get("podIP"):
        return None
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if not ready:
        return None
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == PORT_NAMES[role]:
                ip = status["podIP"]
                host = f"[{ip}]" if ":" in ip else ip
                return f"http://{host}:{port['containerPort']}/metrics"
    return None


class MetricsReader:
    """An HTTP client for scraping; create and close it inside the event loop."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self._session.close()

    async def _text(self, url: str) -> str | None:
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None
                return await response.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            log.info("scraping %s failed: %s", url, err)
            return None

    async def observe(self, pods: Sequence[Mapping[str, Any]]) -> Observation:
        """Every ready pod's sample, by role (routers apart)."""
        targets = [(pod, url) for pod in pods if (url := metrics_url(pod)) is not None]
        texts = await asyncio.gather(*(self._text(url) for _, url in targets))
        engines: dict[str, list] = {}
        routers = []
        for (pod, _), text in zip(targets, texts, strict=True):
            if text is None:
                continue
            name = pod["metadata"]["name"]
            role = pod["metadata"]["labels"][L.ROLE_LABEL]
            try:
                if role == L.ROUTER:
                    routers.append(parse_router(name, text))
                else:
                    engines.setdefault(role, []).append(parse_engine(name, text))
            except ValueError as err:
                log.warning("pod %s: unreadable metrics: %s", name, err)
        return Observation(engines=engines, routers=routers)
