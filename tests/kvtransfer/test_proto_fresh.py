"""The committed generated code must match what grpcio-tools makes from proto/splitserve.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("splitserve_pb2.py", "splitserve_pb2.pyi", "splitserve_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    # Same command as the Makefile's `proto` target (-P: the repo root never lands on sys.path).
    subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "grpc_tools.protoc",
            "-Isplitserve/proto=proto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "proto/splitserve.proto",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "splitserve" / "proto" / name).read_text()
        != (ROOT / "proto" / name).read_text()
    ]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_generated_code_imports_under_namespace() -> None:
    grpc_module = (ROOT / "proto" / "splitserve_pb2_grpc.py").read_text()
    assert "from splitserve.proto import splitserve_pb2" in grpc_module
    from splitserve.proto import splitserve_pb2 as pb

    assert pb.PROTOCOL_VERSION >= 1
    # fixed64 fields carry full unsigned 64-bit values (block hashes, epochs) losslessly.
    batch = pb.KVEventBatch(epoch=2**64 - 1)
    batch.events.add().stored.block_hashes.append(2**64 - 2)
    back = pb.KVEventBatch.FromString(batch.SerializeToString())
    assert back.epoch == 2**64 - 1
    assert back.events[0].stored.block_hashes[0] == 2**64 - 2


@pytest.mark.parametrize(
    "service", ["PrefillService", "DecodeService", "KVService", "EngineService"]
)
def test_services_are_declared(service: str) -> None:
    from splitserve.proto import splitserve_pb2 as pb

    assert service in pb.DESCRIPTOR.services_by_name
