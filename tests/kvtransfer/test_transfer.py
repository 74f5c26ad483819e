"""KV blocks between real processes on 127.0.0.1, over both transports.

The source is ``tests/fixtures/kv_source.py`` (a prefill pod without a model, with
fault injection); the reader is a ``KVPuller`` in the test process.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from kv_source import SourceProcess, make_pool  # tests/fixtures (on sys.path via conftest)

from splitserve.kvtransfer import (
    ChecksumMismatchError,
    EpochMismatchError,
    IncompatiblePeerError,
    KVPuller,
    KVTransferError,
    LeaseExpiredError,
    nixl_available,
)
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.kv_compat import CompatInfo

SMOL = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)
NUM_BLOCKS = 64
SCATTERED = [37, 2, 19, 50, 7, 63, 11, 28]
CORRUPT = 5
HAVE_NIXL, WHY_NO_NIXL = nixl_available()
TRANSPORTS = [
    "grpc",
    pytest.param("nixl", marks=pytest.mark.skipif(not HAVE_NIXL, reason=WHY_NO_NIXL)),
]


def compat(dtype: str = "bfloat16", **overrides) -> CompatInfo:
    facts = dict(model="test-model", revision="r0", dtype=dtype, **SMOL) | overrides
    return CompatInfo(**facts)


def dst_pool(dtype: torch.dtype, num_blocks: int = 96, block_size: int = 16) -> torch.Tensor:
    return torch.zeros(num_blocks, 30, 2, block_size, 3, 64, dtype=dtype)


def grants(ids: list[int], n: int) -> list[str]:
    return [arg for _ in range(n) for arg in ("--grant", ",".join(map(str, ids)))]


def source_args(dtype: str, *extra: str) -> list[str]:
    return ["--dtype", dtype, "--num-blocks", str(NUM_BLOCKS), "--seed", "11", *extra]


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def source(request, tmp_path_factory):
    """One source per dtype: hand-offs 0-3 scattered blocks, 4-5 hold the corrupted block."""
    args = source_args(
        request.param,
        *grants(SCATTERED, 4),
        *grants([CORRUPT, 6, 8], 2),
        "--corrupt-block",
        str(CORRUPT),
    )
    with SourceProcess(args, tmp_path_factory.mktemp("kvsrc")) as proc:
        yield request.param, proc
        # No leak: every hand-off the tests took was released, by pull or by its failure path.
        stats = proc.stats()
        assert stats.num_active_leases == 0
        assert stats.num_blocks_free == NUM_BLOCKS
        assert proc.stop() == 0  # a clean shutdown (no abort in gRPC or NIXL teardown)


@pytest.fixture
def puller_for():
    made: list[KVPuller] = []

    def make(dtype: str, transport: str, **compat_overrides) -> KVPuller:
        block_size = compat_overrides.get("block_size", 16)
        torch_dtype = getattr(torch, dtype)
        puller = KVPuller(
            dst_pool(torch_dtype, block_size=block_size),
            compat(dtype, **compat_overrides),
            f"decode-{transport}",
            transports=(transport,),
        )
        made.append(puller)
        return puller

    yield make
    for puller in made:
        puller.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocks_arrive_byte_identical(source, puller_for, transport) -> None:
    dtype, proc = source
    handoff = proc.handoffs[0 if transport == "grpc" else 1]
    puller = puller_for(dtype, transport)
    dst_ids = [90, 3, 41, 0, 77, 12, 55, 8]
    leases_before = proc.stats().num_active_leases
    result = puller.pull(handoff, dst_ids, timeout=20)
    assert result.transport == transport and result.num_blocks == len(SCATTERED)
    expected = make_pool(NUM_BLOCKS, **SMOL, dtype=getattr(torch, dtype), seed=11)
    got = puller.pool.kv_cache
    for src, dst in zip(SCATTERED, dst_ids, strict=True):
        assert torch.equal(
            got[dst].view(-1).view(torch.uint8), expected[src].view(-1).view(torch.uint8)
        )
    untouched = sorted(set(range(96)) - set(dst_ids))
    assert not got[untouched].view(torch.uint8).any()
    puller.flush()  # the release is sent asynchronously
    assert proc.stats().num_active_leases == leases_before - 1  # released after the pull


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_corrupted_block_is_detected(source, puller_for, transport) -> None:
    dtype, proc = source
    handoff = proc.handoffs[4 if transport == "grpc" else 5]
    puller = puller_for(dtype, transport)
    with pytest.raises(ChecksumMismatchError) as info:
        puller.pull(handoff, [1, 2, 3], timeout=20)
    if transport == "nixl":  # read first, then verified: the bad block is named
        assert info.value.block_indices == (0,)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_epoch_is_refused_before_any_read(source, puller_for, transport) -> None:
    dtype, proc = source
    handoff = pb.KVHandoff()
    handoff.CopyFrom(proc.handoffs[2 if transport == "grpc" else 3])
    handoff.epoch ^= 0xFFFF
    puller = puller_for(dtype, transport)
    with pytest.raises(EpochMismatchError, match="restarted"):
        puller.pull(handoff, [10, 11, 12, 13, 14, 15, 16, 17], timeout=20)
    assert not puller.pool.kv_cache.view(torch.uint8).any()
    # The genuine hand-off is still good (and this releases it for the leak check).
    handoff.epoch ^= 0xFFFF
    puller.pull(handoff, [10, 11, 12, 13, 14, 15, 16, 17], timeout=20)


@pytest.mark.parametrize("field, value", [("block_size", 32), ("model", "another-model")])
def test_incompatible_peer_is_refused_at_handshake(source, puller_for, field, value) -> None:
    dtype, proc = source
    puller = puller_for(dtype, "grpc", **{field: value})
    with pytest.raises(IncompatiblePeerError, match=f"{field}: source=") as info:
        puller.handshake(proc.address)
    assert field in info.value.differences


def test_expired_lease_is_refused_and_its_blocks_return(tmp_path: Path, puller_for) -> None:
    args = source_args("bfloat16", "--lease-seconds", "0.5", *grants([1, 2, 3], 2))
    with SourceProcess(args, tmp_path) as proc:
        assert proc.stats().num_blocks_free == NUM_BLOCKS - 3
        time.sleep(1.0)  # past the lease; the reaper runs every 50 ms
        stats = proc.stats()
        assert (stats.num_blocks_free, stats.num_active_leases) == (NUM_BLOCKS, 0)
        transports = ["grpc", "nixl"] if HAVE_NIXL else ["grpc"]
        for handoff, transport in zip(proc.handoffs, transports, strict=False):
            with pytest.raises(LeaseExpiredError):
                puller_for("bfloat16", transport).pull(handoff, [4, 5, 6], timeout=10)


def test_restarted_source_refuses_old_handoffs(tmp_path: Path, puller_for) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = source_args("bfloat16", "--port", str(port), "--transports", "grpc", *grants([4], 1))
    puller = puller_for("bfloat16", "grpc")
    with SourceProcess(args, tmp_path) as first:
        old = first.handoffs[0]
        puller.handshake(first.address)
        first.kill()
    with SourceProcess(args, tmp_path) as second:
        assert second.epoch != first.epoch and second.port == port
        with pytest.raises(EpochMismatchError):
            puller.pull(old, [0], timeout=10)
        puller.pull(second.handoffs[0], [0], timeout=10)  # the new incarnation's own is fine


def test_grpc_source_killed_mid_stream_fails_fast(tmp_path: Path, puller_for) -> None:
    many = list(range(48))
    args = source_args(
        "bfloat16", "--die-after-chunks", "3", "--max-chunk-bytes", "65536", *grants(many, 1)
    )
    with SourceProcess(args, tmp_path) as proc:
        puller = puller_for("bfloat16", "grpc")
        start = time.monotonic()
        with pytest.raises(KVTransferError) as info:
            puller.pull(proc.handoffs[0], many, timeout=15)
        assert time.monotonic() - start < 15
        assert info.value.reason in ("unreachable", "peer_error", "timeout")
        proc.proc.wait(timeout=10)
        assert proc.proc.returncode == 9  # it really died mid-stream


@pytest.mark.skipif(not HAVE_NIXL, reason=WHY_NO_NIXL)
def test_nixl_source_killed_fails_within_deadline(tmp_path: Path, puller_for) -> None:
    args = source_args("bfloat16", *grants([1, 2], 1), *grants([3, 4], 1))
    with SourceProcess(args, tmp_path) as proc:
        puller = puller_for("bfloat16", "nixl")
        puller.pull(proc.handoffs[0], [0, 1], timeout=20)  # NIXL peer connected and warm
        endpoint = puller.handshake(proc.address).endpoints
        proc.kill()
        sink = puller._sinks["nixl"]
        for attempt in ("one-sided read", "full pull"):
            start = time.monotonic()
            with pytest.raises(KVTransferError):
                if attempt == "one-sided read":  # the READ itself, past the lease check
                    sink.read(None, proc.handoffs[1], endpoint, [5, 6], time.monotonic() + 5)
                else:
                    puller.pull(proc.handoffs[1], [5, 6], timeout=5)
            assert time.monotonic() - start < 6, attempt


def test_concurrent_pulls_on_both_transports(tmp_path: Path) -> None:
    """Decode servers pull for many requests at once: one puller per transport, 6 threads each."""
    from concurrent.futures import ThreadPoolExecutor

    rng = torch.Generator().manual_seed(3)
    plans = [torch.randperm(NUM_BLOCKS, generator=rng)[:5].tolist() for _ in range(24)]
    args = source_args(
        "bfloat16", *[a for ids in plans for a in ("--grant", ",".join(map(str, ids)))]
    )
    transports = ["grpc", "nixl"] if HAVE_NIXL else ["grpc"]
    with SourceProcess(args, tmp_path) as proc:
        expected = make_pool(NUM_BLOCKS, **SMOL, dtype=torch.bfloat16, seed=11)
        pullers = {
            t: KVPuller(dst_pool(torch.bfloat16, 120), compat(), f"d-{t}", (t,)) for t in transports
        }
        jobs = [(i, transports[i % len(transports)]) for i in range(len(plans))]

        def pull(job: tuple[int, str]) -> None:
            i, transport = job
            dst = list(range(5 * i, 5 * i + 5))
            pullers[transport].pull(proc.handoffs[i], dst, timeout=30)

        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(pull, jobs))
        for i, transport in jobs:
            got = pullers[transport].pool.kv_cache
            for j, src in enumerate(plans[i]):
                assert torch.equal(
                    got[5 * i + j].view(torch.int16), expected[src].view(torch.int16)
                )
        for puller in pullers.values():
            puller.close()
        stats = proc.stats()
        assert (stats.num_active_leases, stats.num_blocks_free) == (0, NUM_BLOCKS)
