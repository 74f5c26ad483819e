"""Compatibility hash, handshake check and block checksums."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from splitserve.kvtransfer.checksum import (
    block_checksum,
    block_checksums,
    byte_view,
    mismatched,
)
from splitserve.kvtransfer.compat import check_compatible
from splitserve.kvtransfer.errors import IncompatiblePeerError
from splitserve.kvtransfer.pool import KVPool, allocate_kv_pool
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.kv_compat import CompatInfo, kv_compat_hash

SMOL = CompatInfo("SmolLM2-135M-Instruct", "q4_1", "bfloat16", 16, 30, 3, 64)


def test_compat_hash_is_stable_across_processes() -> None:
    code = (
        "from splitserve.protocol.kv_compat import CompatInfo, kv_compat_hash;"
        "print(kv_compat_hash(CompatInfo('SmolLM2-135M-Instruct','q4_1','bfloat16',16,30,3,64)))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},  # a different str-hash seed must not matter
    ).stdout.strip()
    assert out == kv_compat_hash(SMOL)
    assert len(out) == 32


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "other"),
        ("revision", "r2"),
        ("dtype", "float32"),
        ("block_size", 32),
        ("num_layers", 29),
        ("num_kv_heads", 4),
        ("head_dim", 128),
        ("protocol_version", PROTOCOL_VERSION + 1),
        ("quantization", "int8"),
    ],
)
def test_every_field_changes_hash_and_is_named(field: str, value: object) -> None:
    other = dataclasses.replace(SMOL, **{field: value})
    assert kv_compat_hash(other) != kv_compat_hash(SMOL)
    with pytest.raises(IncompatiblePeerError, match=field) as info:
        check_compatible(SMOL, other)
    assert info.value.differences == (field,)
    assert info.value.reason == "incompatible"


def test_quantization_schemes_differ_and_unquantized_hash_is_unchanged() -> None:
    # Each scheme computes different K/V for the same prompt: no two may pair.
    hashes = {kv_compat_hash(dataclasses.replace(SMOL, quantization=q)) for q in ("int8", "w8a8")}
    hashes.add(kv_compat_hash(dataclasses.replace(SMOL, quantization="gguf")))
    assert len(hashes | {kv_compat_hash(SMOL)}) == 4
    # An unquantized engine hashes as before the field existed (the eight original facts).
    facts = {f.name: getattr(SMOL, f.name) for f in dataclasses.fields(SMOL)}
    del facts["quantization"]
    encoded = json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
    assert kv_compat_hash(SMOL) == hashlib.blake2b(encoded, digest_size=16).hexdigest()
    q8 = dataclasses.replace(SMOL, quantization="w8a8")
    assert CompatInfo.from_proto(q8.to_proto()) == q8
    with pytest.raises(ValueError, match="quantization"):
        dataclasses.replace(SMOL, quantization="fp4")


def test_compatible_and_proto_round_trip() -> None:
    check_compatible(SMOL, dataclasses.replace(SMOL))
    assert CompatInfo.from_proto(SMOL.to_proto()) == SMOL
    assert CompatInfo("m", "r", "torch.bfloat16", 16, 1, 1, 1).dtype == "bfloat16"
    with pytest.raises(ValueError, match="block_size"):
        CompatInfo("m", "r", "bfloat16", 0, 1, 1, 1)


def test_checksum_sees_one_bit_and_reads_in_place() -> None:
    pool = torch.randn(8, 2, 2, 4, 3, 8).to(torch.bfloat16)
    sums = block_checksums(pool, range(8))
    assert len(set(sums)) == 8
    view = byte_view(pool[3])
    assert view.ctypes.data == pool[3].data_ptr()  # no copy
    pool[3].view(-1).view(torch.uint8)[17] ^= 1
    assert block_checksum(pool[3]) != sums[3]
    assert mismatched(pool, [2, 3, 4], [sums[2], sums[3], sums[4]]) == [1]
    assert all(0 <= s < 2**64 for s in sums)


def test_pool_view_and_hugepage_pool() -> None:
    pool = allocate_kv_pool(5, 30, 16, 3, 64, torch.bfloat16)
    view = KVPool(pool)
    assert view.block_nbytes == 368_640  # the SmolLM2 block
    assert view.blocks_u8().shape == (5, 368_640)
    assert view.blocks_u8()[2].data_ptr() == pool[2].data_ptr()
    assert int(pool.abs().sum()) == 0
    pool[4] = 1.5
    assert float(pool[4].float().mean()) == 1.5
    assert view.layout().order == "block,layer,kv,slot,head,dim"
    with pytest.raises(ValueError, match="out of range"):
        view.check_block_ids([0, 5])
    with pytest.raises(ValueError, match="contiguous"):
        KVPool(pool.transpose(0, 1))
