"""The kopf registration: wires events and a timer to `reconcile`, nothing else.

Create, update and resume run a reconcile pass at once; a timer repeats it so drift is undone
(level-based, not edge-based). A second timer runs the autoscaler (``autoscale/``), which
reconciles with the sizes it decides. Deletion removes the children promptly (owner references
would collect them too) under our finalizer. Status is written through kopf's ``patch``; Events
through ``kopf.event``; retries through TemporaryError / PermanentError.

Passes of one resource never overlap (a lock in its kopf memo), and every pass starts from the
status the previous pass wrote and renders the autoscaled roles at the autoscaler's latest
sizes, both kept in that memo: kopf may hand a timer a body whose status predates the last
patch (this operator is the status' only writer), which would otherwise undo a scaling
decision or repeat an Event.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import kopf

from splitserve.operator import crd
from splitserve.operator.adapters import AdapterProbe, GrpcAdapterProbe
from splitserve.operator.autoscale.runner import autoscale_pass
from splitserve.operator.autoscale.scrape import MetricsReader
from splitserve.operator.health import OperatorMetrics
from splitserve.operator.kube import Credentials, KubeApi
from splitserve.operator.labels import PREFIX
from splitserve.operator.login import default_login
from splitserve.operator.reconcile import ReconcileResult, delete_children, reconcile

RETRY_DELAY_S = 15.0


def credentials_from(info: kopf.ConnectionInfo) -> Credentials:
    ca_data = info.ca_data
    return Credentials(
        server=info.server,
        token=info.token,
        ca_path=info.ca_path,
        ca_data=ca_data.encode() if isinstance(ca_data, str) else ca_data,
        insecure=bool(info.insecure),
        certificate_path=info.certificate_path,
        private_key_path=info.private_key_path,
    )


def configure(settings: kopf.OperatorSettings) -> None:
    """Keep kopf's bookkeeping in our annotations and post only warnings as kopf Events."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.WARNING


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def outcome(result: ReconcileResult) -> tuple[str, str]:
    """(result, error reason) of a pass, for the operator's metrics."""
    ready = next((c for c in result.status.get("conditions") or [] if c["type"] == "Ready"), {})
    reason = ready.get("reason", "")
    if reason == "InvalidSpec":
        return "invalid_spec", reason
    if reason == "ApplyFailed":
        return ("retry" if result.retry == "temporary" else "apply_failed"), reason
    return "ok", ""


def _key(body: kopf.Body) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _ready(result: ReconcileResult) -> str:
    for cond in result.status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status"))
    return "Unknown"


def _current(body: kopf.Body, memo: kopf.Memo) -> dict[str, Any]:
    """``body`` with the status this operator last wrote (newer than kopf's copy, or equal)."""
    current = dict(body)
    if memo.get("status") is not None:
        current["status"] = memo["status"]
    return current


def _deliver(result: ReconcileResult, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    # What the status is once the merge patch lands (None deletes a field).
    status = dict(memo.get("status") or body.get("status") or {})
    for key, value in result.status.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    memo["status"] = status
    patch["status"] = result.status
    for event in result.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if result.retry == "temporary":
        raise kopf.TemporaryError(result.error, delay=RETRY_DELAY_S)


def _lock(memo: kopf.Memo) -> asyncio.Lock:
    """The resource's pass lock (kopf's memo is per resource object)."""
    lock = memo.get("pass_lock")
    if lock is None:
        lock = memo["pass_lock"] = asyncio.Lock()
    return lock


def _scale(memo: kopf.Memo) -> dict[str, int] | None:
    """The autoscaler's latest sizes for this resource (None before its first pass)."""
    state = memo.get("autoscaler")
    return state.replicas if state is not None else None


def make_registry(
    login: Callable[[], kopf.ConnectionInfo] = default_login,
    *,
    interval: float = 30.0,
    autoscale_interval: float = 10.0,
    adapter_probe: AdapterProbe | None = None,
    metrics: OperatorMetrics | None = None,
) -> kopf.OperatorRegistry:
    """A registry with every handler; ``login`` serves kopf and our own client alike.
    ``adapter_probe`` asks engine pods for their LoRA adapters (default: their gRPC port);
    every pass is timed and counted in ``metrics``."""
    adapter_probe = adapter_probe or GrpcAdapterProbe()
    registry = kopf.OperatorRegistry()
    metrics = metrics or OperatorMetrics()
    resource = (crd.GROUP, crd.VERSION, crd.PLURAL)

    @kopf.on.login(registry=registry)
    def _login(**_: Any) -> kopf.ConnectionInfo:
        return login()

    @kopf.on.startup(registry=registry)
    async def _startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        memo.api = KubeApi(lambda: credentials_from(login()))
        memo.metrics_reader = MetricsReader()
        memo.adapter_probe = adapter_probe

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.api.close()
        await memo.metrics_reader.close()

    async def _reconcile_pass(
        trigger: str, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo
    ) -> ReconcileResult:
        """One reconcile of ``body`` under the pass lock, observed as ``trigger``, delivered."""
        async with _lock(memo):
            with metrics.observe(trigger) as report:
                result = await reconcile(
                    memo.api, _current(body, memo), _now(), memo.adapter_probe,
                    scale=_scale(memo),
                )  # fmt: skip
                report(*outcome(result))
            metrics.set_ready(_key(body), _ready(result))
            _deliver(result, body, patch, memo)
        return result

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    async def on_change(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        result = await _reconcile_pass("change", body, patch, memo)
        if result.retry == "permanent":
            # Nothing to retry until the spec changes; the timer keeps status current.
            raise kopf.PermanentError(result.error)

    @kopf.timer(*resource, id="drift", interval=interval, initial_delay=interval, registry=registry)
    async def on_timer(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        await _reconcile_pass("timer", body, patch, memo)

    @kopf.timer(
        *resource, id="autoscale", interval=autoscale_interval, initial_delay=autoscale_interval,
        registry=registry,
    )  # fmt: skip
    async def on_autoscale(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        async with _lock(memo):
            with metrics.observe("autoscale") as report:
                done = await autoscale_pass(
                    memo.api, memo.metrics_reader, _current(body, memo), memo.get("autoscaler"),
                    time.monotonic(), _now(), memo.adapter_probe,
                )  # fmt: skip
                report(*(outcome(done.result) if done.result is not None else ("ok", "")))
            memo["autoscaler"] = done.state
            if done.result is not None:
                metrics.set_ready(_key(body), _ready(done.result))
                _deliver(done.result, body, patch, memo)

    @kopf.on.delete(*resource, id="cleanup", registry=registry)
    async def on_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        meta = body["metadata"]
        deleted = await delete_children(memo.api, meta["namespace"], meta["name"], meta["uid"])
        metrics.set_ready(_key(body), None)
        if deleted:
            kopf.event(body, type="Normal", reason="Deleted", message=", ".join(deleted))

    return registry
