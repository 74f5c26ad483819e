"""Block-pool invariants under random workloads (hypothesis), driving the real scheduler and KV
manager with simulated model outputs: no leak, refcounts consistent, pool full at the end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.config import SchedulerConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.scheduler import Scheduler
from splitserve.protocol.sampling import SamplingParams

BLOCK = 4

request_st = st.tuples(
    st.lists(
        st.integers(0, 5), min_size=1, max_size=30
    ),  # prompt (small alphabet: shared prefixes)
    st.integers(1, 12),  # max tokens
    st.integers(1, 3),  # n
)


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(request_st, min_size=1, max_size=12),
    num_blocks=st.integers(12, 40),
    budget=st.integers(4, 64),
    caching=st.booleans(),
    abort_every=st.integers(0, 7),
    seed=st.integers(0, 1000),
)
def test_random_workload_keeps_pool_consistent(
    requests, num_blocks, budget, caching, abort_every, seed
):
    kv = KVCacheManager(num_blocks, BLOCK, caching)
    kv.pool.publish_events = True
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=budget), kv)
    reqs = []
    for i, (prompt, max_tokens, n) in enumerate(requests):
        if len(prompt) + max_tokens > num_blocks * BLOCK:
            continue
        params = SamplingParams(max_tokens=max_tokens, n=n)
        req = Request(f"r{i}", prompt, params, BLOCK)
        reqs.append(req)
        sched.add(req)
    forked: set[str] = set()
    step = 0
    stored: dict[int, int] = {}
    while sched.num_unfinished and step < 2000:
        step += 1
        out = sched.schedule()
        for item in out.scheduled:
            r = item.request
            assert (
                len(kv.tables[r.request_id]) * BLOCK >= r.num_computed_tokens + item.num_new_tokens
            )
        sched.update_after_step(out)
        for item in out.scheduled:
            r = item.request
            if not item.completes or r.is_finished:
                continue
            if r.params.n > 1 and r.sample_index == 0 and r.request_id not in forked:
                forked.add(r.request_id)
                for j in range(1, r.params.n):
                    child = r.fork(f"{r.request_id}#{j}", j)
                    kv.fork(r, child)
                    sched.add_running(child)
            token = (seed + step + r.sample_index) % 6
            for seq in [r] + [
                c for c in sched.running if c.group_id == r.request_id and c is not r
            ]:
                if seq.num_tokens == seq.num_computed_tokens:
                    seq.append_output_token(token)
                    if seq.num_output_tokens >= seq.params.max_tokens:
                        sched.finish(seq, RequestStatus.FINISHED_LENGTH)
        if abort_every and step % abort_every == 0 and sched.running:
            victim = sched.running[-1]
            sched.finish(victim, RequestStatus.FINISHED_ABORTED)
        kv.check_integrity()
        for event in kv.pool.take_events():
            if hasattr(event, "parent_hash"):
                stored[event.block_hash] = event.block_id
            else:
                assert stored.pop(event.block_hash) == event.block_id
    assert not sched.num_unfinished, "the workload must drain"
    assert kv.pool.num_free_blocks == num_blocks
    assert not kv.tables
    kv.check_integrity()
