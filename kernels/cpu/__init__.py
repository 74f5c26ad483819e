"""C++ CPU kernels (ATen ops under ``torch.ops.splitserve_cpu``): prebuilt, or built on first use.

``paged_decode_attention`` reads each sequence's K/V blocks in place from the pool, where the
pure-torch path first copies them out with ``index_select``; ``paged_prefill_attention`` is a
tiled flash attention for prompts (bf16, AVX512-BF16), ~4x the throughput of torch's CPU SDPA
here; ``dense_linear`` runs decode-sized matmuls over float32 or bf16 weights at the speed of
reading them. They are compiled from the ``*.cpp`` files here by ``torch.utils.cpp_extension``
(a C++ compiler and ninja are needed); the instruction set is chosen at run time, so one build
serves every x86-64 CPU.

Where ``load()`` finds them, in order:

1. A prebuilt library for exactly these sources and this torch: ``<dir>/splitserve_cpu-<digest>/
   splitserve_cpu.so`` under ``$SPLITSERVE_CPU_KERNELS_DIR`` or the package's own ``prebuilt/``
   folder. The image builds it there (``scripts/image-install.sh``, ``prebuild()``), so pods load
   it in milliseconds and never need a compiler.
2. Unless ``SPLITSERVE_CPU_KERNELS_JIT=0`` (the image sets it: a pod must not depend on what
   compiler its node happens to have), a build on first use (~10-20 s once), cached under
   ``~/.cache/splitserve/torch_extensions`` keyed by the sources, so concurrent processes wait for
   one build. ``make install`` builds them ahead of time. The builders take turns by an
   ``flock`` on ``build.flock`` there, which the kernel releases when its holder dies: torch's own
   ``lock`` file outlives a builder killed mid-compile, and every later process would wait on it
   forever (an engine that never became ready, with an empty log); under the flock such a file
   can only be stale, and it is removed.

Where neither works, ``load()`` returns ``None`` once with a logged reason and callers keep the
torch path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = [
    _HERE / name
    for name in (
        "paged_decode.cpp",
        "paged_prefill.cpp",
        "quant_linear.cpp",
        "fused_ops.cpp",
        "dense_linear.cpp",
    )
]
_NAME = "splitserve_cpu"
PREBUILT_DIR_ENV = "SPLITSERVE_CPU_KERNELS_DIR"
JIT_ENV = "SPLITSERVE_CPU_KERNELS_JIT"
PACKAGE_PREBUILT_DIR = _HERE / "prebuilt"


def source_digest() -> str:
    """Names one build: the sources (and headers) and the torch version they build against."""
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(_HERE.glob("*.cpp")) + sorted(_HERE.glob("*.h")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def build_directory() -> Path:
    """Cache directory for these sources and torch version (a new source builds afresh)."""
    root = Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))
    return root / "torch_extensions" / f"{_NAME}-{source_digest()}"


def prebuilt_roots() -> list[Path]:
    """Folders searched for a prebuilt library: the env var's, then the package's."""
    roots = [Path(d) for d in os.environ.get(PREBUILT_DIR_ENV, "").split(os.pathsep) if d]
    return [*roots, PACKAGE_PREBUILT_DIR]


def prebuilt_library() -> Path | None:
    """The prebuilt library for these sources, if one exists."""
    leaf = Path(f"{_NAME}-{source_digest()}") / f"{_NAME}.so"
    for root in prebuilt_roots():
        if (root / leaf).is_file():
            return root / leaf
    return None


def _ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the venv's pip-installed one may not be on it."""
    if shutil.which("ninja") is None:
        venv_bin = str(Path(sys.executable).parent)
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")


def _compile(directory: Path) -> Path:
    """Build the library into ``directory`` (raises when no compiler/ninja); its path."""
    from torch.utils.cpp_extension import load as build_and_load

    _ensure_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    build_and_load(
        name=_NAME,
        sources=[str(p) for p in _SOURCES],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return directory / f"{_NAME}.so"


def _build_once(directory: Path) -> None:
    """Build into the shared cache ``directory`` unless a finished build is there; one process at
    a time (see the module docstring on the lock)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.flock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # released by the kernel if the holder dies
        baton = directory / "lock"  # torch's FileBaton: only a dead builder's can exist now
        if baton.exists():
            log.warning("removing %s, left by a C++ kernel build that did not finish", baton)
            baton.unlink(missing_ok=True)
        if not (directory / f"{_NAME}.so").is_file():
            log.info("building the C++ CPU kernels into %s (once per source change)", directory)
        _compile(directory)  # loads the library; ninja rebuilds only what changed


def prebuild(dest: Path | None = None) -> Path:
    """Compile the kernels into ``dest`` (default: the package's ``prebuilt/``), for ``load()``
    to find without a compiler; returns the library. Image build time: raises on failure, and
    removes libraries of other sources there."""
    dest = (dest or PACKAGE_PREBUILT_DIR).resolve()
    final = dest / f"{_NAME}-{source_digest()}"
    library = final / f"{_NAME}.so"
    if library.is_file():
        return library
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".build-") as scratch:
        built = _compile(Path(scratch))
        staging = Path(scratch) / "out"
        staging.mkdir()
        shutil.copy2(built, staging / library.name)
        os.chmod(staging / library.name, 0o755)
        for other in dest.glob(f"{_NAME}-*"):
            shutil.rmtree(other, ignore_errors=True)
        staging.rename(final)
    return library


@functools.cache
def load() -> object | None:
    """Load (building once if allowed) the ops; ``torch.ops.splitserve_cpu`` or ``None``."""
    if os.environ.get("SPLITSERVE_DISABLE_CPU_KERNELS", "").strip() in ("1", "true", "yes"):
        log.info("C++ CPU kernels disabled by SPLITSERVE_DISABLE_CPU_KERNELS")
        return None
    library = prebuilt_library()
    if library is not None:
        try:
            torch.ops.load_library(str(library))
        except Exception as exc:  # a foreign or damaged build: try the other ways
            log.warning("prebuilt C++ CPU kernels %s do not load: %s", library, exc)
        else:
            log.info("C++ CPU kernels: prebuilt %s", library)
            return torch.ops.splitserve_cpu
    if os.environ.get(JIT_ENV, "").strip() in ("0", "false", "no"):
        log.warning(
            "C++ CPU kernels unavailable, using the torch attention path: no prebuilt build for "
            "these sources (searched %s) and %s=0 forbids compiling",
            ", ".join(map(str, prebuilt_roots())),
            JIT_ENV,
        )
        return None
    try:
        directory = build_directory()
        _build_once(directory)
    except Exception as exc:  # compiler / ninja missing, unsupported platform
        log.warning("C++ CPU kernels unavailable, using the torch attention path: %s", exc)
        return None
    _prune_old_builds(directory)
    return torch.ops.splitserve_cpu


_PRUNE_AFTER_S = 24 * 3600


def _prune_old_builds(keep: Path) -> None:
    """Remove builds of other source versions untouched for a day (another checkout sharing the
    cache may be building or loading a newer one; a process using an old one keeps its mapping)."""
    now = time.time()
    for other in keep.parent.glob(f"{_NAME}-*"):
        try:
            stale = now - other.stat().st_mtime > _PRUNE_AFTER_S
        except OSError:
            continue
        if other != keep and stale:
            shutil.rmtree(other, ignore_errors=True)


def available() -> bool:
    return load() is not None


def available_impls() -> list[int]:
    """Implementations this CPU runs: 0 scalar, 1 AVX-512 fp32, 2 AVX-512 BF16."""
    ops = load()
    return list(ops.available_impls()) if ops is not None else []


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    impl: int = -1,
) -> torch.Tensor:
    """One query per sequence over its paged K/V: ``[B, Hq, D]`` -> ``[B, Hq, D]``.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, Hkv, D]`` views (blocks may be strided);
    ``block_tables``: int32 ``[B, max_blocks]``; ``seq_lens``: int32 ``[B]``, each >= 1, keys
    included. float32 or bfloat16. Raises ``RuntimeError`` if the ops could not be built.
    """
    ops = load()
    if ops is None:
        raise RuntimeError("splitserve C++ CPU kernels are not available (see the log)")
    return ops.paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, impl)


def prefill_supported(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether ``paged_prefill_attention`` takes these shapes on this CPU (bf16, AVX512-BF16)."""
    return (
        2 in available_impls()
        and dtype == torch.bfloat16
        and head_dim in (32, 64, 128)
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= 8
    )


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of prompts (or prompt chunks) over their paged K/V: ``[T, Hq, D]``.

    Prompt ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b + 1]``, the last of its
    ``seq_lens[b]`` positions; its K/V (context and new tokens) must already be in the cache.
    bf16 only, see ``prefill_supported``.
    """
    ops = load()
    if ops is None:
        raise RuntimeError("splitserve C++ CPU kernels are not available (see the log)")
    return ops.paged_prefill_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale
    )


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: int = -1
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` [M, K] and a float32 or bf16 ``weight`` [N, K]
    read in place, fp32 products and sums, the result in ``x``'s dtype (``dense_linear.cpp``).
    Meant for small M (decode batches); ``impl``: 0 scalar, 1 AVX-512, -1 the best here."""
    ops = load()
    if ops is None:
        raise RuntimeError("splitserve C++ CPU kernels are not available (see the log)")
    return ops.dense_linear(x, weight, bias, impl)


def dense_impls() -> list[int]:
    """``dense_linear`` implementations this CPU runs: 0 scalar, 1 AVX-512."""
    ops = load()
    return list(ops.dense_impls()) if ops is not None else []


__all__ = [
    "available",
    "available_impls",
    "build_directory",
    "load",
    "prebuild",
    "prebuilt_library",
    "dense_impls",
    "dense_linear",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_supported",
]
