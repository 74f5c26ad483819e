"""The KV compatibility contract between two engines that exchange KV blocks.

Block bytes only mean the same thing on both sides if model, weights revision, dtype, weight
quantization and the KV shape agree, and both speak the same protocol. ``kv_compat_hash``
digests exactly those facts with a fixed encoding (never Python's randomised ``hash``), so it is
stable across processes and hosts; ``differences`` names every differing field so an operator
sees *why* two pods refuse.

Not to be confused with the operator's ``rollout_hash`` (a digest of the whole InferenceService
spec that labels pods during a rollout): two pods with different rollout hashes may still share
a KV layout, and only the KV compatibility hash decides whether blocks can move between them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from splitserve.proto import splitserve_pb2 as pb

PROTOCOL_VERSION: int = pb.PROTOCOL_VERSION

# Weight quantization schemes an engine may run (vLLM-like names; docs/quantization.md):
# "int8": int8 weights, one scale per output channel, activations stay in the model dtype;
# "w8a8": int8 weights and int8 activations (dynamic per-token scales), int8 dot products where
#         the CPU has them (AVX512-VNNI / AVX-VNNI / AMX-INT8);
# "gguf": the GGUF file's own quantized blocks (Q8_0, Q4_0, Q4_1) kept as they are.
QUANTIZATIONS: tuple[str, ...] = ("int8", "w8a8", "gguf")


@dataclass(frozen=True)
class CompatInfo:
    """Facts two engines must share before KV blocks can move between them."""

    model: str
    revision: str
    dtype: str  # "bfloat16" | "float32" | "float16" (torch names without the "torch." prefix)
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    protocol_version: int = PROTOCOL_VERSION
    # Weight quantization ("" for none, else one of QUANTIZATIONS). It belongs here although the
    # KV dtype and shape stay the same: K/V are projections of the hidden states through the
    # (quantized) weights, so an int8 prefill pod writes blocks that differ from a bf16 one's for
    # the same prompt. A decode pod continuing from them would run a model that never produced
    # that context: not a crash, silently different output (and prefix-cache hits mixing both).
    quantization: str = ""

    def __post_init__(self) -> None:
        if self.quantization and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"CompatInfo.quantization must be empty or one of {QUANTIZATIONS}, "
                f"got {self.quantization!r}"
            )
        if self.dtype.startswith("torch."):
            object.__setattr__(self, "dtype", self.dtype.removeprefix("torch."))
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "protocol_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CompatInfo.{name} must be a positive integer, got {value!r}")

    def to_proto(self) -> pb.CompatInfo:
        return pb.CompatInfo(**asdict(self))

    @classmethod
    def from_proto(cls, msg: pb.CompatInfo) -> CompatInfo:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


def kv_compat_hash(info: CompatInfo) -> str:
    """A stable hex digest of every field of ``info`` (sorted-key JSON, BLAKE2b-128).

    An unquantized engine's digest leaves the ``quantization`` field out, so it is the same as
    before the field existed (pods of an older release still pair with it)."""
    facts = asdict(info)
    if not info.quantization:
        del facts["quantization"]
    encoded = json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def differences(
    local: CompatInfo, remote: CompatInfo, names: tuple[str, str] = ("local", "remote")
) -> tuple[str, ...]:
    """``"field: local=... remote=..."`` for every field that differs (empty when compatible)."""
    a, b = names
    return tuple(
        f"{f.name}: {a}={getattr(local, f.name)!r} {b}={getattr(remote, f.name)!r}"
        for f in fields(CompatInfo)
        if getattr(local, f.name) != getattr(remote, f.name)
    )
