"""WireChunk writes the protobuf wire format by hand: it must parse as the message it stands for."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.kvtransfer.grpc_transport import (
    WireChunk,
    _varint,
    serialize_read_response,
)
from splitserve.proto import splitserve_pb2 as pb


@given(st.integers(0, 2**64 - 1))
def test_varint_matches_protobuf(n: int) -> None:
    if n:  # proto3 leaves a zero field out; its explicit encoding still decodes to zero
        assert pb.ReadBlocksResponse(offset=n).SerializeToString() == b"\x08" + _varint(n)
    assert pb.ReadBlocksResponse.FromString(b"\x08" + _varint(n)).offset == n


@settings(max_examples=60, deadline=None)
@given(
    offset=st.integers(0, 2**40),
    sizes=st.lists(st.integers(0, 70_000), max_size=5),
    block_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    checksums=st.lists(st.integers(0, 2**64 - 1), max_size=4),
    total=st.integers(0, 2**50),
    seed=st.integers(0, 2**32 - 1),
)
def test_wire_chunk_parses_as_the_message(offset, sizes, block_ids, checksums, total, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    header = pb.ReadBlocksResponse(
        offset=offset, block_ids=block_ids, block_checksums=checksums, total_bytes=total
    )
    chunk = WireChunk(header, parts, sum(sizes))
    expected = pb.ReadBlocksResponse()
    expected.CopyFrom(header)
    expected.data = b"".join(p.tobytes() for p in parts)
    assert pb.ReadBlocksResponse.FromString(serialize_read_response(chunk)) == expected
    assert chunk.to_message() == expected
    assert serialize_read_response(expected) == expected.SerializeToString()
