"""Weights from a Hugging Face hub (huggingface.co, a mirror or any endpoint speaking its API).

One listing resolves the revision to a commit, then each file is fetched pinned to that commit,
so a branch that moves mid-download cannot mix two versions. The token is the hub library's own
``HF_TOKEN`` and the endpoint its ``HF_ENDPOINT`` (the download step gets both from the
InferenceService's credentials Secret and endpoint).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from splitserve.storage.progress import Progress

# When a repository has safetensors weights, other weight formats are copies: skip them (as
# vLLM does), and the repository's "original/" checkpoints.
OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.onnx", "*.onnx_data",
                 "*.gguf", "*.tflite", "*.ot", "original/*")  # fmt: skip


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int


@dataclass(frozen=True)
class Snapshot:
    """What a revision resolved to: its commit and the files worth fetching."""

    commit: str
    files: tuple[RemoteFile, ...]


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def wanted(names: list[str]) -> list[str]:
    """The files an engine needs: everything, less redundant weight formats."""
    if not any(n.endswith(".safetensors") for n in names):
        return names
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in OTHER_WEIGHTS)]


def resolve(repo_id: str, revision: str) -> Snapshot:
    """The commit ``revision`` names and its files (raises the hub library's errors)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint()).model_info(
        repo_id, revision=revision or "main", files_metadata=True
    )
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    files = tuple(RemoteFile(n, sizes[n]) for n in sorted(wanted(list(sizes))))
    return Snapshot(commit=info.sha or revision, files=files)


def fetch(repo_id: str, snapshot: Snapshot, dest: Path, complete: set[str]) -> None:
    """Download every file of ``snapshot`` into ``dest``; ``complete`` names files already
    there from this very commit (the completion marker says so), which are not asked for."""
    from huggingface_hub import hf_hub_download

    progress = Progress(len(snapshot.files), sum(f.size for f in snapshot.files))
    for f in snapshot.files:
        path = dest / f.name
        if f.name in complete and path.is_file() and path.stat().st_size == f.size:
            progress.file_done(f.name, f.size, fetched=False)
            continue
        hf_hub_download(
            repo_id, f.name, revision=snapshot.commit, local_dir=dest, endpoint=endpoint()
        )
        progress.file_done(f.name, f.size, fetched=True)
