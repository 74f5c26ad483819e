"""Apply engine KV-event batches to the prefix index, detecting gaps and restarts.

Events come in batches numbered 1, 2, 3, ... per (engine_id, epoch). The stream is only trusted
while it is gap-free: a skipped sequence number or a new epoch means the router missed stores or
removals, so it clears the pod's entries and resubscribes with ``snapshot=true`` (the snapshot
batch is ``AllCleared`` followed by ``BlockStored`` of every cached block).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.proto import splitserve_pb2 as pb
from splitserve.services.router.prefix_index import PodBlocks


@dataclass
class StreamCursor:
    """Where one pod's event stream stands."""

    engine_id: str | None = None
    epoch: int | None = None
    sequence: int = 0
    synced: bool = False  # a snapshot (or the first batch from sequence 1) has been applied


class ResyncNeeded(Exception):
    """The stream skipped batches or the engine restarted: resubscribe with a snapshot."""


def apply_batch(blocks: PodBlocks, cursor: StreamCursor, batch: pb.KVEventBatch) -> None:
    """Fold one batch into ``blocks``. Raises ``ResyncNeeded`` (after clearing) on a gap."""
    same_stream = cursor.engine_id == batch.engine_id and cursor.epoch == batch.epoch
    if batch.snapshot:
        blocks.clear()
    elif not cursor.synced:
        # Without a snapshot the only safe start is the engine's very first batch.
        if batch.sequence != 1:
            blocks.clear()
            raise ResyncNeeded(f"first batch has sequence {batch.sequence} and no snapshot")
    elif not same_stream or batch.sequence != cursor.sequence + 1:
        blocks.clear()
        cursor.synced = False
        raise ResyncNeeded(
            f"expected {cursor.engine_id}/{cursor.epoch}#{cursor.sequence + 1}, "
            f"got {batch.engine_id}/{batch.epoch}#{batch.sequence}"
        )
    for event in batch.events:
        kind = event.WhichOneof("event")
        if kind == "stored":
            blocks.store(event.stored.block_hashes)
        elif kind == "removed":
            blocks.remove(event.removed.block_hashes)
        elif kind == "cleared":
            blocks.clear()
    cursor.engine_id, cursor.epoch, cursor.sequence = batch.engine_id, batch.epoch, batch.sequence
    cursor.synced = True
