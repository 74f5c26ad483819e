"""LoRA adapters as every side names them: the request (vLLM's ``LoRARequest``), what an engine
reports it has loaded (``AdapterInfo``), and the adapter's part of the prefix-cache hash.

Torch-free: the router imports it. The cache key of an adapter is its name *and* the digest of its
files, so blocks computed with one adapter are never found by a request for another, nor for the
same name reloaded from different files; engines and the router add it to a request's extra keys
the same way (``with_adapter_key``), so their block hashes stay equal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Names are what clients put in ``model``: printable, no spaces, bounded (they travel in labels).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}$")
MAX_ADAPTER_NAME = 128


def check_adapter_name(name: object, field: str = "lora_name") -> str:
    """The name, or ValueError naming ``field`` when it cannot name an adapter."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{field} must be 1-{MAX_ADAPTER_NAME} characters of letters, digits and ._:@+/- "
            f"starting with a letter or digit; got {str(name)[:200]!r}"
        )
    return name


@dataclass(frozen=True)
class LoRARequest:
    """Run a request with a LoRA adapter (vLLM's shape: name, integer id, path).

    ``lora_path`` is a directory in PEFT format (``adapter_config.json`` +
    ``adapter_model.safetensors``), ``file://`` + such a directory, or ``hf://org/name`` (a hub
    repository, where a hub is reachable). The name is what identifies the adapter to the engine
    and to clients; the integer id is kept for vLLM compatibility.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        check_adapter_name(self.lora_name)
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise ValueError(f"lora_int_id must be an integer, got {self.lora_int_id!r}")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be positive, got {self.lora_int_id}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path must name the adapter's directory")

    # vLLM's aliases
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter as an engine reports it (``EngineInfo.lora_adapters``)."""

    name: str
    digest: str  # of adapter_config.json + the weights: part of the prefix-cache key
    rank: int
    path: str  # where it was loaded from, as given
    int_id: int = 0

    @property
    def cache_key(self) -> str:
        return adapter_cache_key(self.name, self.digest)


def adapter_cache_key(name: str, digest: str) -> str:
    """The extra key an adapter adds to every block hash of its requests."""
    return f"lora:{name}:{digest}"


def with_adapter_key(extra_keys: Sequence[str], adapter: AdapterInfo | None) -> tuple[str, ...]:
    """A request's extra keys with its adapter's cache key last (engines and router alike)."""
    keys = tuple(extra_keys)
    return keys if adapter is None else (*keys, adapter.cache_key)
