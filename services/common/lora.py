"""LoRA on the engine servers: the flags' adapters, the request's adapter checked against the
loaded one, and the adapter list file the operator mounts (watched, so adapters come and go
without a restart)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.lora import LoRAExistsError, LoRANotFoundError
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.lora import LoRARequest, check_adapter_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAModule:
    """One ``--lora-modules`` entry: ``NAME=PATH`` or vLLM's JSON ``{"name", "path"}``."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> LoRAModule:
        """Raises ValueError naming the entry when it is neither form."""
        text = text.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"--lora-modules entry {text[:200]!r}: {exc}") from exc
            name, path = obj.get("name"), obj.get("path")
        else:
            name, _, path = text.partition("=")
        if not path or not isinstance(path, str):
            raise ValueError(f"--lora-modules entry {text[:200]!r} must be NAME=PATH")
        return cls(check_adapter_name(name, "--lora-modules name"), path)


def read_modules_file(path: Path) -> dict[str, str]:
    """The adapter list file: JSON ``[{"name", "path"}, ...]`` -> name -> path."""
    entries = json.loads(path.read_text() or "[]")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{name, path}}")
    out: dict[str, str] = {}
    for entry in entries:
        module = LoRAModule.parse(json.dumps(entry))
        out[module.name] = module.path
    return out


def request_adapter(engine: AsyncEngine, request: pb.PrefillRequest) -> str | None:
    """The adapter name a request runs with (None: the base model), checked against the loaded
    one: raises ``LoRANotFoundError`` when it is not loaded here and ``AdapterMismatch`` when
    the request was routed for other files under that name."""
    if not request.HasField("lora"):
        return None
    name = request.lora.name
    loaded = engine.lora_adapter(name)
    if loaded is None:
        raise LoRANotFoundError(f"the LoRA adapter {name!r} is not loaded on this engine")
    if request.lora.digest and request.lora.digest != loaded.digest:
        raise AdapterMismatch(
            f"LoRA adapter {name!r} here has digest {loaded.digest}, the request was routed for "
            f"{request.lora.digest}"
        )
    return name


class AdapterMismatch(ValueError):
    """The request names an adapter whose files differ here (FAILED_PRECONDITION)."""


def lora_status(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of an adapter error, or None if it is not one."""
    if isinstance(exc, LoRANotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AdapterMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, LoRAExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    return None


async def load_modules(engine: AsyncEngine, modules: list[LoRAModule]) -> None:
    """Load the ``--lora-modules`` at start; any failure is fatal (the flags are wrong)."""
    for i, module in enumerate(modules, start=1):
        info = await engine.add_lora(LoRARequest(module.name, i, module.path))
        log.info("LoRA adapter %s loaded from %s (rank %d)", info.name, info.path, info.rank)


async def watch_modules_file(engine: AsyncEngine, path: Path, interval_s: float = 2.0) -> None:
    """Forever: load the adapters the file adds, unload those it drops (a changed path: both).

    Only the file's own changes are acted on, so adapters loaded at run time through the API
    are left alone. A bad entry is logged and retried at the next change of the file.
    """
    applied: dict[str, str] = {}
    last = None
    while True:
        try:
            text = path.read_text() if path.exists() else "[]"
            if text != last:
                wanted = read_modules_file(path) if path.exists() else {}
                applied = await _sync(engine, applied, wanted)
                last = text
        except (OSError, ValueError) as exc:
            log.error("LoRA modules file %s: %s", path, exc)
        await asyncio.sleep(interval_s)


async def _sync(engine: AsyncEngine, applied: dict[str, str], wanted: dict[str, str]):
    done = dict(applied)
    for name, path in applied.items():
        if wanted.get(name) != path:
            await engine.remove_lora(name)
            done.pop(name)
            log.info("LoRA adapter %s unloaded (adapter list file)", name)
    for i, (name, path) in enumerate(sorted(wanted.items()), start=1):
        if done.get(name) == path:
            continue
        try:
            info = await engine.add_lora(LoRARequest(name, i, path))
        except ValueError as exc:
            log.error("LoRA adapter %s from %s not loaded: %s", name, path, exc)
            continue
        done[name] = path
        log.info("LoRA adapter %s loaded from %s (rank %d)", name, path, info.rank)
    return done
