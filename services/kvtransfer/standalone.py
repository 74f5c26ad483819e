"""A stand-alone KV source process: a random pool served over KVService, for tests and benchmarks.

It plays a prefill pod without a model: it fills a pool with seeded random bytes, leases the block
lists given by ``--grant`` and writes the hand-offs, its port and epoch to ``--ready-file`` (JSON,
written atomically) once it serves. ``EngineService.GetStats`` reports free blocks and live
leases, so a test can see expired leases return their blocks. Fault injection:
``--die-after-chunks N`` kills the process (``os._exit``) in the middle of a ReadBlocks stream,
like a pod lost mid-transfer; ``--corrupt-block B`` flips a byte of block B after its checksum was
taken, like a leased block overwritten by mistake.

    python -P -m splitserve.services.kvtransfer.standalone --ready-file /tmp/r.json --grant 0,3,9
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.services.kvtransfer.compat import CompatInfo
from splitserve.services.kvtransfer.pool import allocate_kv_pool
from splitserve.services.kvtransfer.servicer import GRPC_OPTIONS, KVServicer
from splitserve.services.kvtransfer.source import KVBlockSource, SourceConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def make_pool(
    num_blocks: int,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    hugepages: bool = False,
) -> torch.Tensor:
    """A pool filled with seeded random bytes: the same arguments give the same bytes."""
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    if hugepages:
        pool = allocate_kv_pool(*shape[:2], *shape[3:], dtype=dtype)
    else:
        pool = torch.empty(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    raw = pool.view(-1).view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return pool


class _BlockAccounting:
    """Reference counts of leased blocks, standing in for the engine's block pool."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs: dict[int, int] = {}
        self.lock = threading.Lock()

    def take(self, block_ids: list[int]) -> None:
        with self.lock:
            for b in block_ids:
                self.refs[b] = self.refs.get(b, 0) + 1

    def free(self, block_ids: tuple[int, ...]) -> None:
        with self.lock:
            for b in block_ids:
                left = self.refs[b] - 1  # KeyError = a double free: crash loudly
                if left:
                    self.refs[b] = left
                else:
                    del self.refs[b]

    def num_free(self) -> int:
        with self.lock:
            return self.num_blocks - len(self.refs)


class _Stats(pb_grpc.EngineServiceServicer):
    def __init__(self, source: KVBlockSource, blocks: _BlockAccounting) -> None:
        self.source, self.blocks = source, blocks

    def GetStats(self, request, context) -> pb.EngineStats:
        free = self.blocks.num_free()
        return pb.EngineStats(
            engine_id=self.source.config.engine_id,
            epoch=self.source.epoch,
            role="prefill",
            num_blocks_total=self.blocks.num_blocks,
            num_blocks_free=free,
            kv_cache_usage=1 - free / self.blocks.num_blocks,
            num_active_leases=len(self.source.leases),
            model=self.source.config.compat.model,
            block_size=self.source.pool.block_size,
        )


class _DyingServicer(KVServicer):
    """Exits the process after sending ``die_after`` ReadBlocks chunks (fault injection)."""

    def __init__(self, source: KVBlockSource, die_after: int) -> None:
        super().__init__(source)
        self.die_after = die_after
        self.sent = 0

    def ReadBlocks(self, request, context):
        for message in super().ReadBlocks(request, context):
            if self.sent >= self.die_after:
                os._exit(9)
            self.sent += 1
            yield message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--engine-id", default="standalone-prefill")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--revision", default="r0")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transports", default="nixl,grpc")
    parser.add_argument("--lease-seconds", type=float, default=30.0)
    parser.add_argument("--grant", action="append", default=[], help="comma-separated block ids")
    parser.add_argument("--hugepages", action="store_true", help="back the pool with THP")
    parser.add_argument("--die-after-chunks", type=int, default=-1)
    parser.add_argument("--max-chunk-bytes", type=int, default=4 << 20)
    parser.add_argument(
        "--corrupt-block",
        type=int,
        default=-1,
        help="flip one byte of this block after the grants (a block overwritten under a lease)",
    )


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    pool = make_pool(
        args.num_blocks,
        args.num_layers,
        args.block_size,
        args.num_kv_heads,
        args.head_dim,
        dtype,
        args.seed,
        args.hugepages,
    )
    compat = CompatInfo(
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        block_size=args.block_size,
        num_layers=args.num_layers,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    blocks = _BlockAccounting(args.num_blocks)
    config = SourceConfig(
        engine_id=args.engine_id,
        compat=compat,
        grpc_address=f"127.0.0.1:{port}",
        transports=tuple(args.transports.split(",")),
        lease_seconds=args.lease_seconds,
        max_chunk_bytes=args.max_chunk_bytes,
    )
    source = KVBlockSource(pool, config, lambda lease: blocks.free(lease.block_ids))
    servicer = (
        _DyingServicer(source, args.die_after_chunks)
        if args.die_after_chunks >= 0
        else KVServicer(source)
    )
    servicer.add_to_server(server)
    pb_grpc.add_EngineServiceServicer_to_server(_Stats(source, blocks), server)
    handoffs = []
    for i, spec in enumerate(args.grant):
        ids = [int(x) for x in spec.split(",")]
        blocks.take(ids)
        handoff = source.grant(f"req-{i}", ids, num_tokens=len(ids) * args.block_size)
        handoffs.append(base64.b64encode(handoff.SerializeToString()).decode())
    if args.corrupt_block >= 0:
        pool[args.corrupt_block].view(-1).view(torch.uint8)[12345 % pool[0].nbytes] ^= 0x40
    source.start_reaper(0.05)
    server.start()
    ready = {"port": port, "epoch": source.epoch, "pid": os.getpid(), "handoffs": handoffs}
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(ready))
    tmp.replace(args.ready_file)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(0.2):
        if os.getppid() != parent:  # the test or benchmark died: do not linger
            break
    server.stop(0).wait(5)  # let gRPC finish shutting down before the interpreter exits
    source.close()
    return 0


def load_handoff(encoded: str) -> pb.KVHandoff:
    """Decode a hand-off written to the ready file."""
    return pb.KVHandoff.FromString(base64.b64decode(encoded))


class SourceProcess:
    """A running stand-alone source (a child process), as tests and benchmarks drive it."""

    def __init__(self, args: list[str], workdir: Path, timeout: float = 60.0) -> None:
        self.ready_file = workdir / f"kv-source-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-P", "-m", __name__, "--ready-file", str(self.ready_file), *args]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"KV source exited with {self.proc.returncode}: {cmd}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"KV source not ready after {timeout} s: {cmd}")
            time.sleep(0.02)
        ready = json.loads(self.ready_file.read_text())
        self.port: int = ready["port"]
        self.epoch: int = ready["epoch"]
        self.address = f"127.0.0.1:{self.port}"
        self.handoffs = [load_handoff(h) for h in ready["handoffs"]]

    def stats(self, timeout: float = 5.0) -> pb.EngineStats:
        with grpc.insecure_channel(self.address) as channel:
            return pb_grpc.EngineServiceStub(channel).GetStats(pb.StatsRequest(), timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to release anything."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code (0 for a clean shutdown)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.ready_file.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> SourceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtransfer-standalone", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
