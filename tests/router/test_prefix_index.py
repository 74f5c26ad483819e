"""The prefix index and KV-event application: properties against a model of the engine cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.block_hash import hash_prompt_blocks
from splitserve.services.router.kv_events import ResyncNeeded, StreamCursor, apply_batch
from splitserve.services.router.prefix_index import PrefixIndex

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def stored(hashes) -> pb.KVEvent:
    return pb.KVEvent(stored=pb.BlockStored(block_hashes=list(hashes), block_size=BS))


def removed(hashes) -> pb.KVEvent:
    return pb.KVEvent(removed=pb.BlockRemoved(block_hashes=list(hashes)))


def batch(seq: int, events, epoch: int = 1, snapshot: bool = False) -> pb.KVEventBatch:
    return pb.KVEventBatch(
        engine_id="e", epoch=epoch, sequence=seq, events=events, snapshot=snapshot
    )


prompts = st.lists(st.integers(0, 5), min_size=0, max_size=6).map(
    lambda xs: [t for x in xs for t in [x] * BS]  # tokens from few values: prefixes collide often
)


@settings(max_examples=200, deadline=None)
@given(cached=st.lists(prompts, max_size=6), evict=st.lists(st.integers(0, 40)), query=prompts)
def test_match_equals_longest_cached_prefix(cached, evict, query):
    """The index answers exactly what the engine holds: the longest chain of present blocks."""
    index = PrefixIndex()
    blocks = index.pod("p")
    blocks.live = True
    cursor = StreamCursor()
    engine: set[int] = set()
    seq = 0
    for prompt in cached:
        hashes = hash_prompt_blocks(prompt, BS)
        engine.update(hashes)
        seq += 1
        apply_batch(blocks, cursor, batch(seq, [stored(hashes)]))
    gone = [h for i, h in enumerate(sorted(engine)) if i in set(evict)]
    engine.difference_update(gone)
    seq += 1
    apply_batch(blocks, cursor, batch(seq, [removed(gone)]))

    q = hash_prompt_blocks(query, BS)
    want = 0
    for h in q:
        if h not in engine:
            break
        want += 1
    assert index.match(q, ["p"]) == {"p": want}
    assert blocks.precise == engine


def test_extra_keys_separate_prefixes():
    index = PrefixIndex()
    blocks = index.pod("p")
    blocks.store(hash_prompt_blocks([1] * 8, BS, ("salt-a",)))
    assert index.match(hash_prompt_blocks([1] * 8, BS, ("salt-a",)), ["p"]) == {"p": 2}
    assert index.match(hash_prompt_blocks([1] * 8, BS), ["p"]) == {"p": 0}


def test_gap_or_new_epoch_clears_and_demands_resync():
    index = PrefixIndex()
    blocks = index.pod("p")
    cursor = StreamCursor()
    apply_batch(blocks, cursor, batch(1, [stored([11, 12])]))
    apply_batch(blocks, cursor, batch(2, [stored([13])]))
    assert blocks.precise == {11, 12, 13}
    with pytest.raises(ResyncNeeded):
        apply_batch(blocks, cursor, batch(4, [stored([14])]))  # 3 was lost
    assert blocks.precise == set()
    # The resubscription's snapshot restores the full state.
    snap = batch(9, [pb.KVEvent(cleared=pb.AllCleared()), stored([11, 13])], snapshot=True)
    apply_batch(blocks, cursor, snap)
    assert blocks.precise == {11, 13}
    with pytest.raises(ResyncNeeded):
        apply_batch(blocks, cursor, batch(10, [stored([20])], epoch=2))  # the engine restarted
    assert blocks.precise == set()


def test_first_batch_without_snapshot_must_start_at_one():
    index = PrefixIndex()
    blocks = index.pod("p")
    with pytest.raises(ResyncNeeded):
        apply_batch(blocks, StreamCursor(), batch(5, [stored([1])]))
    cursor = StreamCursor()
    apply_batch(blocks, cursor, batch(1, [stored([1])]))
    assert blocks.precise == {1}


def test_speculative_entries_expire_only_while_events_are_live():
    clock = Clock()
    index = PrefixIndex(speculative_ttl_s=5.0, speculative_capacity=3, clock=clock)
    blocks = index.pod("p")
    index.record_routed("p", [1, 2])
    assert index.match([1, 2], ["p"]) == {"p": 2}
    clock.t = 10.0
    assert index.match([1, 2], ["p"]) == {"p": 2}  # no events: the LRU is all we know
    blocks.live = True
    assert index.match([1, 2], ["p"]) == {"p": 0}  # events live: trust them, not old guesses
    index.record_routed("p", [1, 2])
    assert index.match([1, 2], ["p"]) == {"p": 2}  # a fresh guess bridges the event delay
    blocks.live = False
    index.record_routed("p", [3, 4])  # capacity 3: the oldest entry goes
    assert index.match([1, 2, 3, 4], ["p"]) == {"p": 0}
    assert index.match([2, 3, 4], ["p"]) == {"p": 3}


def test_unknown_and_dropped_pods_match_nothing():
    index = PrefixIndex()
    index.pod("a").store([1])
    index.drop_pod("a")
    assert index.match([1], ["a", "b"]) == {"a": 0, "b": 0}
