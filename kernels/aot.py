"""Compile the kernels ahead of time for a real GPU target, with no GPU present.

Triton's interpreter proves the math but accepts things the GPU compiler rejects (tl.dot shapes,
dtype mixes, control flow). This module compiles each wrapper's *planned* launch (the same
argument list and constexprs the wrapper would launch with) down to a cubin, and reports register
use and spills from `ptxas -v`: Triton bundles LLVM and ptxas, so no device or driver is needed.

Run it in a process where TRITON_INTERPRET is unset and no kernel has been interpreted: after
the interpreter has run these kernels, compiling them in the same process fails.

    python -P -m splitserve.kernels.aot --arch 90
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ._launch import Launch
from .cache_write import plan_reshape_and_cache
from .decode import plan_decode
from .prefill import plan_prefill

_POINTER = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def _signature_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    ptx: str


@dataclass(frozen=True)
class RegisterReport:
    """What `ptxas -v` says about one kernel: register pressure decides the tile sizes."""

    registers: int
    spill_store_bytes: int
    spill_load_bytes: int


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile `launch` for CUDA compute capability `arch` (e.g. 90) down to a cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = launch.kernel
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    runtime = dict(zip(fn.arg_names, launch.args, strict=False))
    signature = {
        name: "constexpr" if name in launch.constexprs else _signature_type(runtime[name])
        for name in fn.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn, signature, launch.constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(launch.options),
    )
    return Compiled(cubin=compiled.asm["cubin"], ptx=compiled.asm["ptx"])


def register_report(ptx: str, arch: int) -> RegisterReport:
    """Assemble `ptx` again with Triton's bundled ptxas in verbose mode and parse its summary."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    text = proc.stderr + proc.stdout

    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        if match is None:
            raise RuntimeError(f"ptxas -v output lacks {pattern!r}:\n{text}")
        return int(match.group(1))

    return RegisterReport(
        registers=number(r"Used (\d+) registers"),
        spill_store_bytes=number(r"(\d+) bytes spill stores"),
        spill_load_bytes=number(r"(\d+) bytes spill loads"),
    )


def sample_launches() -> Iterator[tuple[str, Launch]]:
    """One planned launch per kernel variant (dtype, split or not, GQA packing), on CPU tensors
    of the engine's layout (per-layer views of a block-major pool)."""
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        kv = torch.zeros(8, 3, 2, 16, 2, 128, dtype=dtype)
        k, v = kv[:, 1, 0], kv[:, 1, 1]
        tables = torch.zeros(2, 8, dtype=torch.int32)
        lens = torch.tensor([100, 3], dtype=torch.int32)
        q = torch.zeros(2, 6, 128, dtype=dtype)
        for partition in (32, 512):  # 32: split + reduce; 512: one partition, direct write
            for launch in plan_decode(
                q, k, v, tables, lens, 0.1, torch.empty_like(q), partition, 128
            ):
                yield f"decode[{name},partition={partition}] {launch.kernel.__name__}", launch
        for heads in (2, 6, 16):  # GQA 1, 3, 8
            qp = torch.zeros(10, heads, 128, dtype=dtype)
            qsl = torch.tensor([0, 4, 10], dtype=torch.int32)
            launch = plan_prefill(qp, k, v, tables, qsl, lens, 0.1, torch.empty_like(qp), 6)
            yield f"prefill[{name},gqa={heads // 2}]", launch
        key = torch.zeros(5, 2, 128, dtype=dtype)
        yield f"reshape_and_cache[{name}]", plan_reshape_and_cache(key, key, k, v, torch.arange(5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--only", default="", help="compile only variants whose label has this")
    args = parser.parse_args(argv)
    for label, launch in sample_launches():
        if args.only not in label:
            continue
        start = time.perf_counter()
        compiled = compile_launch(launch, args.arch)
        ms = (time.perf_counter() - start) * 1e3
        regs = register_report(compiled.ptx, args.arch)
        print(
            f"sm_{args.arch} {label}: cubin {len(compiled.cubin)} bytes ({ms:.0f} ms), "
            f"{regs.registers} registers, spill {regs.spill_store_bytes}/"
            f"{regs.spill_load_bytes} bytes stored/loaded"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
