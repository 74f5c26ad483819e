"""The engine's adapters: registered by name, counted while requests use them, made resident in
``max_loras`` slots as steps need them, and turned into each step's ``LoRAStep``.

Three tiers, vLLM's: registered (name -> path, listable, what requests may name); in host memory
(the checked weights; at most ``max_cpu_loras`` of the unused ones, least recently used ones
dropped and read again on their next use); resident (in a slot, at most ``max_loras``, evicted
least recently used when a step needs another). The scheduler never puts more than
``max_loras`` distinct adapters in one step, so a step's adapters always fit.

Removing an adapter takes its name away at once (new requests get ``LoRANotFoundError``);
requests already running with it finish with the same weights, which are dropped after them.
Touched by the engine thread only, except ``read`` (pure: it reads files and builds tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from splitserve.engine.lora.config import LoRAConfig
from splitserve.engine.lora.peft_format import AdapterError, LoadedAdapter, read_adapter
from splitserve.engine.lora.slots import LoRASlots, LoRAStep
from splitserve.engine.model.llama import LlamaArch
from splitserve.protocol.lora import AdapterInfo, LoRARequest


class LoRANotFoundError(ValueError):
    """A request names an adapter that is not loaded (servers answer 404)."""


class LoRAExistsError(ValueError):
    """An adapter of that name is loaded already, from other files."""


@dataclass
class _Entry:
    request: LoRARequest
    info: AdapterInfo
    adapter: LoadedAdapter | None  # None: dropped from host memory, read again on next use
    refs: int = 0  # request groups using it
    registered: bool = True  # False once removed (kept until its last request ends)
    last_used: int = field(default=0)


class LoRAManager:
    def __init__(
        self, config: LoRAConfig, arch: LlamaArch, dtype: torch.dtype, device: str
    ) -> None:
        self.config = config
        self.arch = arch
        self.dtype = dtype
        self.slots = LoRASlots(arch, config.max_loras, config.max_lora_rank, dtype, device)
        self.device = device
        self._names: dict[str, str] = {}  # registered name -> cache key
        self._entries: dict[str, _Entry] = {}  # cache key -> entry (registered or in use)
        self._tick = 0
        self.fixed_width = False  # every step spans all slots (fixed matmul shapes: warm_up)

    # --- registry ----------------------------------------------------------------------------
    def read(self, request: LoRARequest) -> LoadedAdapter:
        """Read and check an adapter's files (any thread: touches no engine state)."""
        return read_adapter(request, self.arch, self.config.max_lora_rank, self.dtype)

    def add(self, request: LoRARequest) -> AdapterInfo:
        """Register an adapter (reading it now). Loading the same files under the same name
        again is a no-op; other files under a registered name raise ``LoRAExistsError``."""
        return self.register(self.read(request))

    def register(self, adapter: LoadedAdapter) -> AdapterInfo:
        info = adapter.info
        current = self._names.get(info.name)
        if current is not None:
            if current == info.cache_key:
                return self._entries[current].info
            raise LoRAExistsError(f"the LoRA adapter {info.name!r} is already loaded")
        entry = self._entries.get(info.cache_key)
        if entry is None:
            request = LoRARequest(info.name, info.int_id or 1, info.path)
            entry = _Entry(request, info, adapter)
            self._entries[info.cache_key] = entry
        entry.registered = True
        entry.adapter = entry.adapter or adapter
        self._names[info.name] = info.cache_key
        self._trim_host_memory()
        return info

    def remove(self, name: str) -> bool:
        """Unregister ``name``; False if it was not registered. Running requests keep it."""
        key = self._names.pop(name, None)
        if key is None:
            return False
        entry = self._entries[key]
        entry.registered = False
        if entry.refs == 0:
            self._drop(key)
        return True

    def infos(self) -> tuple[AdapterInfo, ...]:
        """The registered adapters, by name."""
        return tuple(self._entries[self._names[n]].info for n in sorted(self._names))

    def get(self, name: str) -> AdapterInfo:
        key = self._names.get(name)
        if key is None:
            raise LoRANotFoundError(f"the LoRA adapter {name!r} is not loaded")
        return self._entries[key].info

    # --- requests ----------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterInfo:
        """A request group starts using ``name``: counted until ``release``. Reads the weights
        again if they were dropped from host memory (``AdapterError`` if that now fails)."""
        info = self.get(name)
        entry = self._entries[info.cache_key]
        if entry.adapter is None:
            entry.adapter = self.read(entry.request)
            if entry.adapter.info.digest != info.digest:
                entry.adapter = None
                raise AdapterError(
                    f"the files of LoRA adapter {name!r} changed since it was loaded: "
                    "unload and load it again"
                )
        entry.refs += 1
        self._tick += 1
        entry.last_used = self._tick
        return info

    def release(self, info: AdapterInfo) -> None:
        entry = self._entries.get(info.cache_key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            entry.refs = 0
            if not entry.registered:
                self._drop(info.cache_key)
            else:
                self._trim_host_memory()

    # --- steps -------------------------------------------------------------------------------
    def prepare_step(
        self, adapters: Sequence[AdapterInfo | None], num_tokens: Sequence[int]
    ) -> LoRAStep | None:
        """The step's ``LoRAStep`` for requests using ``adapters`` (in batch order, None: base)
        with ``num_tokens`` new tokens each; None when no request of the step uses one."""
        used = {a.cache_key for a in adapters if a is not None}
        if not used:
            return None
        loaded = [self._entries[key].adapter for key in used]
        slots = self.slots.assign(loaded)  # type: ignore[arg-type] - in use, so in memory
        width = self.slots.num_slots if self.fixed_width else max(slots.values()) + 1
        index = torch.tensor([-1 if a is None else slots[a.cache_key] for a in adapters])
        per_token = index.repeat_interleave(torch.tensor(num_tokens))
        mask = (per_token[:, None] == torch.arange(width)).to(self.dtype).to(self.device)
        targets = frozenset().union(*(a.targets for a in loaded))  # type: ignore[union-attr]
        return LoRAStep(self.slots, mask, targets)

    # --- memory ------------------------------------------------------------------------------
    def _drop(self, key: str) -> None:
        self._entries.pop(key, None)
        self.slots.evict(key)

    def _trim_host_memory(self) -> None:
        cap = self.config.max_cpu_loras
        if cap is None:
            return
        in_memory = [e for e in self._entries.values() if e.adapter is not None]
        idle = sorted((e for e in in_memory if e.refs == 0), key=lambda e: e.last_used)
        for entry in idle[: max(len(in_memory) - cap, 0)]:
            entry.adapter = None
            self.slots.evict(entry.info.cache_key)

    def total_refs(self) -> int:
        return sum(e.refs for e in self._entries.values())

    def num_in_memory(self) -> int:
        return sum(e.adapter is not None for e in self._entries.values())
