"""LoRA adapters at the router: what each pod has loaded (its ``EngineInfo``), which adapter a
request's ``model`` names, and vLLM's runtime ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` fanned out to the pods.

A request for an adapter goes only to pods that have it loaded with the same files (same digest),
prefill and decode alike, so both apply the very same weights and the hand-off's KV means the same
thing on both sides; the digest travels in the request and both pods check it. Adapters loaded or
unloaded through this router are remembered: a pod that joins (or restarts) later is brought to
the same state as soon as the router learns its facts. Adapters the pods were started with
(``--lora-modules``, the operator's list file) need no router at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from splitserve.protocol.lora import AdapterInfo, check_adapter_name
from splitserve.protocol.wire import adapter_from_proto
from splitserve.services.router.errors import APIError, BackendError
from splitserve.services.router.model_facts import ModelFacts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterView:
    """One adapter as the router sees it over a generation's pods."""

    info: AdapterInfo  # the digest most of its pods have
    parent: str  # the base model's served name
    pods: int  # pods that have it loaded with that digest


def pod_adapters(state) -> dict[str, AdapterInfo]:
    """The adapters a pod reported in its last ``EngineInfo`` (name -> info)."""
    info = state.info
    if info is None or not info.lora_enabled:
        return {}
    return {a.name: adapter_from_proto(a) for a in info.lora_adapters}


def serves(state, adapter: AdapterInfo | None) -> bool:
    """Whether a pod can run a request with ``adapter`` (None: the base model, always)."""
    if adapter is None:
        return True
    have = pod_adapters(state).get(adapter.name)
    return have is not None and have.digest == adapter.digest


class RouterAdapters:
    """The adapters of the pool's pods, and runtime loads / unloads through this router."""

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher  # its pool is built when the app starts
        self.loaded: dict[str, tuple[str, int]] = {}  # loaded here: name -> (path, int id)
        self.unloaded: set[str] = set()  # unloaded here: pods that still have them drop them

    def _pods(self, facts: ModelFacts | None = None) -> list:
        pods = [p for p in self.dispatcher.pool.pods.values() if p.info is not None]
        if facts is not None:
            pods = [p for p in pods if p.tokenizer_id == facts.tokenizer_id]
        return pods

    def views(self, facts: ModelFacts | None) -> dict[str, AdapterView]:
        """Every adapter loaded on some pod of the generation ``facts`` (by name)."""
        if facts is None:
            return {}
        seen: dict[str, Counter] = {}
        infos: dict[tuple[str, str], AdapterInfo] = {}
        for pod in self._pods(facts):
            for name, info in pod_adapters(pod).items():
                seen.setdefault(name, Counter())[info.digest] += 1
                infos[(name, info.digest)] = info
        out = {}
        for name, digests in sorted(seen.items()):
            digest, count = digests.most_common(1)[0]
            out[name] = AdapterView(infos[(name, digest)], facts.served_model_name, count)
        return out

    def resolve(self, model: str | None, facts: ModelFacts) -> AdapterInfo | None:
        """The adapter ``model`` names on the generation ``facts`` (None: the base model)."""
        if model is None:
            return None
        view = self.views(facts).get(model)
        return None if view is None else view.info

    # ---- vLLM's runtime API --------------------------------------------------------------------

    async def load(self, name: str, path: str, facts: ModelFacts) -> str:
        """Load ``name`` from ``path`` on every pod of ``facts``' generation. All or nothing:
        if any pod refuses the adapter (its files, rank, base model), the pods that took it
        unload it again and the refusal is the client's 400."""
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise APIError(400, str(exc), param="lora_name") from exc
        if not path:
            raise APIError(400, "lora_path must name the adapter's directory", param="lora_path")
        if name in facts_names(facts) or name in self.views(facts):
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.",
                           param="lora_name")  # fmt: skip
        pods = [p for p in self._pods(facts) if p.info.lora_enabled]
        if not pods:  # how the engines were started, not a passing outage: the client's 400
            raise APIError(400, "LoRA is not enabled on the engines (--enable-lora)",
                           param="lora_name")  # fmt: skip
        int_id = len(self.loaded) + len(self.unloaded) + 1
        results = await asyncio.gather(
            *(p.client.load_lora_adapter(name, path, int_id) for p in pods),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, BackendError) and not r.retryable]
        if refused:
            done = [p for p, r in zip(pods, results, strict=True) if not isinstance(r, Exception)]
            await asyncio.gather(*(p.client.unload_lora_adapter(name) for p in done),
                                 return_exceptions=True)  # fmt: skip
            raise APIError(400, str(refused[0]), param="lora_path")
        failed = [r for r in results if isinstance(r, BaseException)]
        if len(failed) == len(results):
            raise BackendError(f"no pod could load the adapter: {failed[0]}", retryable=False)
        for err in failed:  # unreachable pods get it when the pool hears from them again
            log.warning("LoRA adapter %s: a pod will load it later: %s", name, err)
        self.loaded[name] = (path, int_id)
        self.unloaded.discard(name)
        await self._refresh(pods)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str, facts: ModelFacts | None) -> str:
        """Unload ``name`` from every pod that has it; 404 when none does."""
        pods = [p for p in self._pods() if name in pod_adapters(p)]
        if not pods and name not in self.loaded:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.",
                           param="lora_name", code="model_not_found")  # fmt: skip
        await asyncio.gather(*(p.client.unload_lora_adapter(name) for p in pods),
                             return_exceptions=True)  # fmt: skip
        self.loaded.pop(name, None)
        self.unloaded.add(name)
        await self._refresh(pods)
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _refresh(self, pods: Iterable) -> None:
        """Learn the pods' new adapter lists now (not at their next stats poll), so the
        answer's effect is visible to the next request."""
        await asyncio.gather(*(self.dispatcher.pool.relearn(p) for p in pods),
                             return_exceptions=True)  # fmt: skip

    async def reconcile(self, pod) -> None:
        """Bring a pod whose facts were (re)learned to what was loaded and unloaded here."""
        have = pod_adapters(pod)
        if not pod.info or not pod.info.lora_enabled:
            return
        changed = False
        for name, (path, int_id) in self.loaded.items():
            if name not in have:
                try:
                    await pod.client.load_lora_adapter(name, path, int_id)
                    changed = True
                except BackendError as err:
                    log.error("pod %s could not load LoRA adapter %s: %s",
                              pod.endpoint.address, name, err)  # fmt: skip
        for name in self.unloaded & set(have):
            try:
                await pod.client.unload_lora_adapter(name)
                changed = True
            except BackendError as err:
                log.warning("pod %s kept LoRA adapter %s: %s", pod.endpoint.address, name, err)
        if changed:
            await self.dispatcher.pool.relearn(pod)


def facts_names(facts: ModelFacts) -> set[str]:
    return {facts.served_model_name, *facts.aliases}
