"""KVService over an in-process gRPC server: status codes, lease life cycle, metrics."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from splitserve.kvtransfer import (
    ChecksumMismatchError,
    EpochMismatchError,
    IncompatiblePeerError,
    KVBlockSource,
    KVPuller,
    KVServicer,
    LeaseExpiredError,
    SourceConfig,
    TransferMetrics,
)
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import (
    GRPC_CHANNEL_OPTIONS,
    GRPC_SERVER_OPTIONS,
    PROTOCOL_VERSION,
)
from splitserve.protocol.kv_compat import CompatInfo

COMPAT = CompatInfo("tiny", "r0", "float32", 4, 2, 2, 8)
SHAPE = (16, 2, 2, 4, 2, 8)


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    clock = Clock()
    freed: list[tuple[int, ...]] = []
    pool = torch.randn(SHAPE)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    config = SourceConfig("prefill-0", COMPAT, f"127.0.0.1:{port}", transports=("grpc",))
    source = KVBlockSource(pool, config, lambda lease: freed.append(lease.block_ids), clock=clock)
    KVServicer(source).add_to_server(server)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_CHANNEL_OPTIONS)
    yield source, pb_grpc.KVServiceStub(channel), pool, freed, clock
    channel.close()
    server.stop(0)
    source.close()


def ref(handoff: pb.KVHandoff, epoch: int | None = None) -> pb.LeaseRef:
    return pb.LeaseRef(
        lease_id=handoff.lease_id,
        engine_id=handoff.engine_id,
        epoch=handoff.epoch if epoch is None else epoch,
    )


def read(stub, handoff, **kw) -> list[pb.ReadBlocksResponse]:
    request = pb.ReadBlocksRequest(lease=ref(handoff, kw.pop("epoch", None)), **kw)
    request.compat_hash = kw.get("compat_hash", handoff.compat_hash)
    return list(stub.ReadBlocks(request, timeout=5))


def test_read_blocks_streams_leased_bytes_in_order(served) -> None:
    source, stub, pool, _, _ = served
    handoff = source.grant("r", [5, 1, 9], num_tokens=11)
    assert handoff.num_tokens == 11 and handoff.block_size == 4
    messages = read(stub, handoff, max_chunk_bytes=64 << 10)
    data = b"".join(m.data for m in messages)
    assert data == b"".join(pool[i].numpy().tobytes() for i in (5, 1, 9))
    assert list(messages[0].block_checksums) == list(handoff.block_checksums)


@pytest.mark.parametrize(
    "mutate, code, reason",
    [
        (dict(epoch=123), grpc.StatusCode.FAILED_PRECONDITION, "epoch_mismatch"),
        (dict(compat_hash="0" * 32), grpc.StatusCode.FAILED_PRECONDITION, "incompatible"),
        (dict(block_ids=[2]), grpc.StatusCode.INVALID_ARGUMENT, "invalid_handoff"),
    ],
)
def test_refused_reads_carry_status_and_reason(served, mutate, code, reason) -> None:
    source, stub, *_ = served
    handoff = source.grant("r", [5, 1], num_tokens=8)
    with pytest.raises(grpc.RpcError) as info:
        read(stub, handoff, **mutate)
    assert info.value.code() == code
    assert info.value.details().startswith(reason + ": ")


def test_expired_lease_is_not_found_and_blocks_freed_once(served) -> None:
    source, stub, _, freed, clock = served
    handoff = source.grant("r", [3, 4], num_tokens=5)
    clock.now += 31
    with pytest.raises(grpc.RpcError) as info:
        read(stub, handoff)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert freed == []  # refused, but freeing is the reaper's job
    assert [lease.lease_id for lease in source.reap()] == [handoff.lease_id]
    assert freed == [(3, 4)]
    assert source.metrics.registry.get_sample_value("splitserve:kv_leases_expired_total") == 1
    assert source.metrics.registry.get_sample_value("splitserve:kv_leases_active") == 0
    reply = stub.Release(pb.ReleaseRequest(lease=ref(handoff)), timeout=5)
    assert not reply.released and freed == [(3, 4)]
    with pytest.raises(grpc.RpcError) as info:
        stub.ExtendLease(pb.ExtendLeaseRequest(lease=ref(handoff)), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_release_and_extend(served) -> None:
    source, stub, _, freed, clock = served
    handoff = source.grant("r", [7], num_tokens=4)
    clock.now += 20
    reply = stub.ExtendLease(pb.ExtendLeaseRequest(lease=ref(handoff), ttl_ms=60_000), timeout=5)
    assert reply.lease_expiry_unix_ms == int((clock.now + 60) * 1000)
    clock.now += 40  # past the original 30 s, inside the extension
    assert read(stub, handoff)
    with pytest.raises(grpc.RpcError) as info:
        stub.Release(pb.ReleaseRequest(lease=ref(handoff, epoch=1)), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = stub.Release(pb.ReleaseRequest(lease=ref(handoff)), timeout=5)
    assert reply.released and reply.num_blocks == 1 and freed == [(7,)]


def test_handshake_names_the_difference(served) -> None:
    source, stub, *_ = served
    other = CompatInfo("tiny", "r0", "float32", 8, 2, 2, 8)
    with pytest.raises(grpc.RpcError) as info:
        stub.Handshake(
            pb.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION, compat=other.to_proto(), transports=["grpc"]
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size: source=4 reader=8" in info.value.details()
    reply = stub.Handshake(
        pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION, compat=COMPAT.to_proto(), transports=["nixl", "grpc"]
        ),
        timeout=5,
    )
    assert reply.epoch == source.epoch and list(reply.endpoints.transports) == ["grpc"]
    with pytest.raises(grpc.RpcError) as info:  # we only offer grpc here
        stub.Handshake(
            pb.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION, compat=COMPAT.to_proto(), transports=["nixl"]
            ),
            timeout=5,
        )
    assert info.value.details().startswith("transport_unavailable: ")


def test_puller_in_process_round_trip_and_typed_errors(served) -> None:
    source, _, pool, freed, _ = served
    registry = CollectorRegistry()
    dst = torch.zeros(SHAPE)
    puller = KVPuller(
        dst, COMPAT, "decode-0", transports=("grpc",), metrics=TransferMetrics(registry)
    )
    try:
        handoff = source.grant("r", [2, 8, 15], num_tokens=12)
        result = puller.pull(handoff, [0, 1, 2])
        assert torch.equal(dst[:3], pool[[2, 8, 15]])
        assert result.num_bytes == 3 * pool[0].nbytes and result.transport == "grpc"
        puller.flush()
        assert freed == [(2, 8, 15)]  # released after the pull
        assert (
            registry.get_sample_value(
                "splitserve:kv_transfer_bytes_total", {"transport": "grpc", "direction": "received"}
            )
            == 3 * pool[0].nbytes
        )

        handoff = source.grant("r2", [3], num_tokens=4)
        stale = pb.KVHandoff()
        stale.CopyFrom(handoff)
        stale.epoch ^= 1
        with pytest.raises(EpochMismatchError):
            puller.pull(stale, [5])
        bad = pb.KVHandoff()
        bad.CopyFrom(handoff)
        bad.block_checksums[0] ^= 1
        with pytest.raises(ChecksumMismatchError):
            puller.pull(bad, [5])
        puller.flush()
        with pytest.raises(LeaseExpiredError):  # the failed pull released the lease
            puller.pull(handoff, [5])
        assert (
            registry.get_sample_value(
                "splitserve:kv_transfer_failures_total",
                {"transport": "grpc", "reason": "checksum_mismatch"},
            )
            == 1
        )
        assert len(source.leases) == 0

        small = torch.zeros(16, 2, 2, 8, 2, 8)  # block_size 8: refused at handshake
        other = KVPuller(small, CompatInfo("tiny", "r0", "float32", 8, 2, 2, 8), "d1", ("grpc",))
        with pytest.raises(IncompatiblePeerError, match="block_size"):
            other.pull(source.grant("r3", [1], num_tokens=4), [0])
        other.close()
    finally:
        puller.close()


def test_two_sources_in_one_process_have_separate_metrics() -> None:
    a, b = TransferMetrics(), TransferMetrics()
    a.leases_expired.inc()
    assert b.registry.get_sample_value("splitserve:kv_leases_expired_total") == 0


async def test_mounts_on_a_grpc_aio_server() -> None:
    """The servicer is synchronous; an aio server runs it on its migration thread pool."""
    import asyncio

    pool = torch.randn(SHAPE)
    server = grpc.aio.server(
        migration_thread_pool=futures.ThreadPoolExecutor(max_workers=2), options=GRPC_SERVER_OPTIONS
    )
    port = server.add_insecure_port("127.0.0.1:0")
    config = SourceConfig("prefill-aio", COMPAT, f"127.0.0.1:{port}", transports=("grpc",))
    source = KVBlockSource(pool, config, lambda lease: None)
    KVServicer(source).add_to_server(server)
    await server.start()
    dst = torch.zeros(SHAPE)
    puller = KVPuller(dst, COMPAT, "decode-aio", transports=("grpc",))
    try:
        handoff = source.grant("r", [3, 4, 9], num_tokens=12)
        await asyncio.to_thread(puller.pull, handoff, [0, 1, 2])
        assert torch.equal(dst[:3], pool[[3, 4, 9]])
        stale = source.grant("r2", [1], num_tokens=4)
        stale.epoch ^= 1
        with pytest.raises(EpochMismatchError):
            await asyncio.to_thread(puller.pull, stale, [5])
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        request = pb.ReadBlocksRequest(lease=ref(stale), compat_hash=stale.compat_hash)
        with pytest.raises(grpc.RpcError) as info:
            async for _ in pb_grpc.KVServiceStub(channel).ReadBlocks(request, timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await channel.close()
    finally:
        await asyncio.to_thread(puller.close)
        await server.stop(0)
        source.close()


def test_unreachable_source_fails_fast_with_a_typed_error(served) -> None:
    import socket
    import time

    from splitserve.kvtransfer import PeerUnreachableError

    source, *_ = served
    handoff = source.grant("r", [1], num_tokens=4)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    handoff.endpoints.grpc_address = dead
    puller = KVPuller(torch.zeros(SHAPE), COMPAT, "decode-x", transports=("grpc",))
    try:
        start = time.monotonic()
        with pytest.raises(PeerUnreachableError, match="Handshake"):
            puller.pull(handoff, [0], timeout=5)
        assert time.monotonic() - start < 5
    finally:
        puller.close()


def test_staged_path_for_device_pools_moves_the_same_bytes(served) -> None:
    """GPU pools go through host memory chunk by chunk; force that path on CPU pools."""
    source, _, pool, _, _ = served
    source._staged, source._blocks_u8 = True, None
    dst = torch.zeros(SHAPE)
    puller = KVPuller(dst, COMPAT, "decode-staged", transports=("grpc",), grpc_chunk_bytes=64 << 10)
    sink = puller._sinks["grpc"]
    sink._staged, sink._rows = True, puller.pool.blocks_u8()
    try:
        handoff = source.grant("r", [11, 0, 6, 13], num_tokens=16)
        puller.pull(handoff, [15, 2, 9, 4])
        assert torch.equal(dst[[15, 2, 9, 4]], pool[[11, 0, 6, 13]])
        assert not dst[[0, 1, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14]].any()
    finally:
        puller.close()
