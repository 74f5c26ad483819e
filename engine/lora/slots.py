"""The resident adapters: ``max_loras`` slots of stacked weights, and one step's batched apply.

Layout, per decoder layer and fused target (``qkv``, ``o``, ``gate_up``, ``down``):

    a[slot]: [S * R, in]    rows s*R .. s*R + r_s: lora_A of the target's slice s
    b[slot]: [S * R, out]   rows s*R .. s*R + r_s, columns of slice s: (scaled lora_B of s)^T

S is the target's slice count (q/k/v: 3, gate/up: 2, else 1), R = max_lora_rank; smaller ranks
and absent modules are zeros. Slots are slot-major, so the first ``k`` slots are one contiguous
``[k * S * R, in]`` matrix and a whole step's update of a target is three tensor ops whatever the
mix of requests:

    s = x @ a[:k].T                  # [rows, k*S*R]: every token against every resident adapter
    s *= mask                        # keep each token's own adapter's columns (one-hot by slot)
    y += s @ b[:k]                   # [rows, out]: B is block-diagonal over the slices

A token without an adapter has an all-zero mask row. The dense shrink costs every token
``k * S * R * in`` extra multiply-adds (a few percent of the base matmul at rank 16), and in
exchange there is no gather, no sort and no Python loop over requests. The block-diagonal B
wastes multiply-adds on zeros (S times the expand's), but keeps a target's update at three ops
writing one contiguous output: per-slice expands measured slower here (strided writes and a
copy per slice), and on a CPU every extra op per layer and step costs more than those zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.lora.peft_format import MODULES, LoadedAdapter, module_shapes
from splitserve.engine.model.llama import LlamaArch

TARGETS = ("qkv", "o", "gate_up", "down")


def target_layout(arch: LlamaArch) -> dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """target -> (in features, slice output sizes, slice output offsets)."""
    shapes = module_shapes(arch)
    out: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}
    for target in TARGETS:
        mods = [m for m, (t, _) in MODULES.items() if t == target]
        sizes = tuple(shapes[m][1] for m in mods)
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        out[target] = (shapes[mods[0]][0], sizes, offsets)
    return out


class LoRASlots:
    """``num_slots`` resident adapters, stacked for the batched apply; evicted least recently
    used. Touched by the engine thread only."""

    def __init__(
        self, arch: LlamaArch, num_slots: int, max_rank: int, dtype: torch.dtype, device
    ) -> None:
        self.num_slots = num_slots
        self.rank = max_rank
        self.layout = target_layout(arch)
        self.weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for _ in range(arch.num_layers):
            layer = {}
            for target, (fan_in, sizes, _) in self.layout.items():
                rows = len(sizes) * max_rank
                a = torch.zeros(num_slots, rows, fan_in, dtype=dtype, device=device)
                b = torch.zeros(num_slots, rows, sum(sizes), dtype=dtype, device=device)
                layer[target] = (a, b)
            self.weights.append(layer)
        self.resident: dict[str, int] = {}  # adapter cache key -> slot
        self._owner: list[str | None] = [None] * num_slots
        self._last_used = [0] * num_slots
        self._tick = 0
        self.num_loads = 0

    def assign(self, adapters: list[LoadedAdapter]) -> dict[str, int]:
        """Make every adapter of a step resident (at most ``num_slots`` of them); returns
        cache key -> slot. Free slots are taken lowest first (so the slots in use stay a short
        prefix); otherwise the least recently used slot that this step does not need."""
        if len(adapters) > self.num_slots:
            raise RuntimeError(f"{len(adapters)} adapters in one step, {self.num_slots} slots")
        self._tick += 1
        wanted = {a.info.cache_key for a in adapters}
        out: dict[str, int] = {}
        for adapter in adapters:
            key = adapter.info.cache_key
            slot = self.resident.get(key)
            if slot is None:
                slot = self._victim(wanted)
                self._load(slot, adapter)
            self._last_used[slot] = self._tick
            out[key] = slot
        return out

    def evict(self, key: str) -> None:
        """Forget an adapter's slot (it was unloaded); the slot's weights are overwritten later."""
        slot = self.resident.pop(key, None)
        if slot is not None:
            self._owner[slot] = None
            self._last_used[slot] = 0

    def _victim(self, wanted: set[str]) -> int:
        free = [s for s, owner in enumerate(self._owner) if owner is None]
        if free:
            return free[0]
        idle = [s for s, owner in enumerate(self._owner) if owner not in wanted]
        return min(idle, key=lambda s: self._last_used[s])

    @torch.inference_mode()
    def _load(self, slot: int, adapter: LoadedAdapter) -> None:
        old = self._owner[slot]
        if old is not None:
            del self.resident[old]
        for layer in self.weights:
            for a, b in layer.values():
                a[slot].zero_()
                b[slot].zero_()
        R = self.rank
        for u in adapter.updates:
            target, s = MODULES[u.module]
            a, b = self.weights[u.layer][target]
            _, sizes, offsets = self.layout[target]
            r = u.a.shape[0]
            a[slot, s * R : s * R + r].copy_(u.a)
            b[slot, s * R : s * R + r, offsets[s] : offsets[s] + sizes[s]].copy_(u.b.T)
        key = adapter.info.cache_key
        self._owner[slot] = key
        self.resident[key] = slot
        self.num_loads += 1


class LoRAStep:
    """One step's adapters: which slot each token uses, and the apply. Built once per step by
    the model runner and passed explicitly to the model's forward."""

    def __init__(self, slots: LoRASlots, mask: torch.Tensor, targets: frozenset[str]) -> None:
        self.slots = slots
        self.mask = mask  # [rows, k] one-hot of each token's slot (zeros: no adapter)
        self.k = mask.shape[1]
        self.targets = targets  # fused targets some adapter of the step changes

    def for_rows(self, rows: int) -> LoRAStep:
        """The same step for ``rows`` matmul rows (padding rows get no update)."""
        if rows == self.mask.shape[0]:
            return self
        return LoRAStep(self.slots, F.pad(self.mask, (0, 0, 0, rows - self.mask.shape[0])),
                        self.targets)  # fmt: skip

    def layer(self, index: int) -> LayerLoRA:
        return LayerLoRA(self, self.slots.weights[index])


class LayerLoRA:
    """The step's updates of one decoder layer."""

    __slots__ = ("step", "weights")

    def __init__(self, step: LoRAStep, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.step = step
        self.weights = weights

    def apply(self, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base projection of ``x``, [rows, out]) plus each row's adapter update."""
        step = self.step
        if target not in step.targets:
            return y
        a, b = self.weights[target]
        k, rows = step.k, x.shape[0]
        shrunk = F.linear(x, a[:k].view(-1, a.shape[-1]))
        shrunk = (shrunk.view(rows, k, -1) * step.mask[:, :, None]).view(rows, -1)
        return y.addmm_(shrunk, b[:k].view(-1, b.shape[-1]))
