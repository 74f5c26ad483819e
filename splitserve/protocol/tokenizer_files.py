"""A tokenizer as files that travel in ``EngineInfo``, and its identity.

The engines load their tokenizer from the model directory; the router must tokenize exactly as
they do, yet it runs in an image without the model. So an engine sends the files its tokenizer
is made of, and the router loads them. ``tokenizer_id`` digests the files: two pods whose
tokenizers differ by a byte have different ids and never serve one request together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

# What a Hugging Face tokenizer (fast or slow) and its chat template can be made of.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "generation_config.json",
)
# The largest tokenizer.json files (e.g. 256k-entry vocabularies) are ~35 MB.
MAX_TOTAL_BYTES = 64 << 20


def read_tokenizer_files(model_dir: str | Path) -> list[tuple[str, bytes]]:
    """The tokenizer files present in ``model_dir``, as (name, content), in a fixed order."""
    root = Path(model_dir)
    files = [(n, (root / n).read_bytes()) for n in TOKENIZER_FILE_NAMES if (root / n).is_file()]
    total = sum(len(c) for _, c in files)
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"tokenizer files of {root} are {total} bytes (> {MAX_TOTAL_BYTES})")
    if not any(
        n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt") for n, _ in files
    ):
        raise ValueError(f"{root} holds no tokenizer (no tokenizer.json, tokenizer.model, ...)")
    return files


def tokenizer_id(files: Iterable[tuple[str, bytes]]) -> str:
    """A stable digest of the files (names and bytes, in name order)."""
    h = hashlib.blake2b(digest_size=16)
    for name, content in sorted(files):
        h.update(name.encode())
        h.update(len(content).to_bytes(8, "little"))
        h.update(content)
    return h.hexdigest()


def write_tokenizer_files(files: Iterable[tuple[str, bytes]], directory: str | Path) -> Path:
    """Write the files into ``directory`` (created) so a tokenizer can be loaded from it."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files:
        if name not in TOKENIZER_FILE_NAMES:  # never a path: names come from another process
            raise ValueError(f"unexpected tokenizer file name {name!r}")
        (root / name).write_bytes(content)
    return root
