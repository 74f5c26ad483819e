"""Reading a LoRA adapter in PEFT's format and checking it fits the loaded model.

A PEFT adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``,
whose tensors are named ``...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`` with
``lora_A`` of shape ``[r, in]`` and ``lora_B`` of shape ``[out, r]``; the update of a module is
``y += (alpha / r) * x @ A^T @ B^T`` (``alpha / sqrt(r)`` with rsLoRA). Only what changes the
output at inference is checked: variants this engine cannot compute (DoRA, LoRA biases, extra
trainable modules, ...) are refused with an error naming them, never silently ignored.

Errors are ``AdapterError`` (a ``ValueError``): servers answer them as 400s naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.engine.model.llama import LlamaArch
from splitserve.protocol.lora import AdapterInfo, LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's module names -> (our fused target, slice index within it)
MODULES = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
# adapter_config.json settings that change what the adapter computes at inference and that this
# engine does not implement: refused when set (truthy).
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style) weights",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "parameter targets (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
}


class AdapterError(ValueError):
    """The adapter cannot be served (missing files, unsupported variant, wrong base model)."""


@dataclass(frozen=True)
class ModuleUpdate:
    """One module's low-rank update: ``y += x @ a.T @ b.T`` (the scaling folded into ``b``)."""

    layer: int
    module: str  # PEFT's name: q_proj ... down_proj
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scaled


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read from disk and checked against the model, kept on the host."""

    info: AdapterInfo
    updates: tuple[ModuleUpdate, ...]

    @property
    def targets(self) -> frozenset[str]:
        """The fused targets (qkv, o, gate_up, down) it changes."""
        return frozenset(MODULES[u.module][0] for u in self.updates)

    @property
    def nbytes(self) -> int:
        return sum(u.a.nbytes + u.b.nbytes for u in self.updates)


def module_shapes(arch: LlamaArch) -> dict[str, tuple[int, int]]:
    """(in, out) features of each PEFT module name in this model."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv, inter = arch.num_heads * d, arch.num_kv_heads * d, arch.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def resolve_adapter_dir(path: str) -> Path:
    """A local directory for the adapter: a path, ``file://`` + path, or ``hf://org/name``
    (downloaded where a hub is reachable)."""
    if path.startswith("hf://"):
        repo = path[len("hf://") :]
        if os.environ.get("HF_HUB_OFFLINE"):
            raise AdapterError(f"cannot download adapter {path!r}: HF_HUB_OFFLINE is set")
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(repo, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
        except Exception as exc:  # network, auth, missing repo: one clear message
            raise AdapterError(f"cannot download adapter {path!r}: {exc}") from exc
        return Path(local)
    return Path(path.removeprefix("file://")).expanduser()


def read_adapter(
    request: LoRARequest, arch: LlamaArch, max_rank: int, dtype: torch.dtype
) -> LoadedAdapter:
    """Read, check and convert a PEFT adapter. Raises ``AdapterError`` naming the problem."""
    name = request.lora_name
    root = resolve_adapter_dir(request.lora_path)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"adapter {name!r}: no {CONFIG_FILE} in {request.lora_path!r}")
    if not weights_path.is_file():
        has_bin = (root / "adapter_model.bin").is_file()
        raise AdapterError(
            f"adapter {name!r}: no {WEIGHTS_FILE} in {request.lora_path!r}"
            + (" (pickled adapter_model.bin is not loaded: convert it to safetensors)"
               if has_bin else "")
        )  # fmt: skip
    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except ValueError as exc:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    _check_config(name, config)
    digest = hashlib.sha256(config_bytes)
    with open(weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    shapes = module_shapes(arch)
    tensors = _read_tensors(name, weights_path)
    updates = []
    ranks = set()
    for (layer, module), pair in sorted(tensors.items()):
        if module not in MODULES:
            raise AdapterError(
                f"adapter {name!r}: LoRA on {module} is not supported "
                f"(supported: {', '.join(MODULES)})"
            )
        if "A" not in pair or "B" not in pair:
            raise AdapterError(f"adapter {name!r}: layers.{layer}.{module} lacks lora_A or lora_B")
        if layer >= arch.num_layers:
            raise AdapterError(_mismatch(name, config, f"it has layer {layer}, this model "
                                         f"{arch.num_layers} layers"))  # fmt: skip
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterError(_mismatch(
                name, config,
                f"layers.{layer}.{module} has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}, this model needs [r, {fan_in}] and [{fan_out}, r]",
            ))  # fmt: skip
        if r > max_rank:
            raise AdapterError(
                f"adapter {name!r} has rank {r}, above this engine's max_lora_rank {max_rank}"
            )
        ranks.add(r)
        scale = _scaling(config, layer, module, r)
        updates.append(ModuleUpdate(layer, module, a.to(dtype), (b.double() * scale).to(dtype)))
    if not updates:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    info = AdapterInfo(
        name=name,
        digest=digest.hexdigest()[:16],
        rank=max(ranks),
        path=request.lora_path,
        int_id=request.lora_int_id,
    )
    return LoadedAdapter(info, tuple(updates))


def _check_config(name: str, config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r} is a {peft_type} adapter; only LoRA is supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"adapter {name!r} uses {what} ({key}), which is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r} trains biases (bias={config['bias']!r})")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} needs a positive {key!r}")


def _read_tensors(name: str, path: Path) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                match = _KEY.search(key)
                if match is None:
                    what = "embedding or LM-head LoRA" if "lora_embedding" in key else "tensor"
                    raise AdapterError(
                        f"adapter {name!r}: unsupported {what} {key!r} (LoRA on the decoder "
                        f"layers' {', '.join(MODULES)} only)"
                    )
                layer, _, module, ab = match.groups()
                out.setdefault((int(layer), module), {})[ab] = f.get_tensor(key).float()
    except AdapterError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise AdapterError(f"adapter {name!r}: cannot read {WEIGHTS_FILE}: {exc}") from exc
    return out


def _scaling(config: dict, layer: int, module: str, rank: int) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA; ``alpha_pattern`` entries
    (matched against the module's full name, as PEFT does) override alpha."""
    alpha = float(config["lora_alpha"])
    full = f"model.layers.{layer}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", full):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _mismatch(name: str, config: dict, detail: str) -> str:
    base = config.get("base_model_name_or_path")
    trained = f" (trained on {base!r})" if base else ""
    return f"adapter {name!r} does not fit this base model{trained}: {detail}"
