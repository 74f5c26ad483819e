"""Routing decisions end to end through the router, against fake pods (fast, no model)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from splitserve.services.router.main import RouterSettings


def _sdk(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)


def _groups(seed: int, n: int = 4, per: int = 5, prefix: int = 320) -> list[list[list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        head = [rng.randrange(1000, 40000) for _ in range(prefix)]
        out.append([head + [rng.randrange(1000, 40000) for _ in range(5)] for _ in range(per)])
    return out


def _owner(pods, head: tuple[int, ...]) -> set[str]:
    return {p.address for p in pods if head in p.engine.heads}


def test_prefix_policy_groups_concurrent_requests_on_one_pod(stack_factory):
    settings = RouterSettings(served_names=("m",), stats_interval_s=0.1)
    with stack_factory(["prefill", "prefill", "decode"], settings) as (router, pods):
        prefill = pods[:2]
        groups = _groups(1)
        sdk = _sdk(router)
        # All 20 requests at once, interleaved: the speculative index must hold groups together
        # before any KV event could have arrived.
        order = [g[i] for i in range(5) for g in groups]
        with ThreadPoolExecutor(20) as ex:
            list(ex.map(lambda p: sdk.completions.create(model="m", prompt=p, max_tokens=1), order))
        owners = [_owner(prefill, tuple(g[0][:32])) for g in groups]
        assert all(len(o) == 1 for o in owners), owners
        assert len(set().union(*owners)) == 2  # and the groups are spread over both pods
        hits = sum(p.engine.hits for p in prefill)
        queries = sum(p.engine.queries for p in prefill)
        assert hits / queries > 0.7  # 16 of 20 requests hit 320 of 325 tokens


def test_approximate_index_without_kv_events(stack_factory):
    """With the event streams off, the LRU of routed prefixes alone keeps groups together."""
    settings = RouterSettings(served_names=("m",), stats_interval_s=0.1, use_kv_events=False)
    with stack_factory(["prefill", "prefill", "decode"], settings) as (router, pods):
        assert not any(p.engine._subscribers for p in pods)
        sdk = _sdk(router)
        groups = _groups(4)
        for i in range(5):
            for g in groups:
                sdk.completions.create(model="m", prompt=g[i], max_tokens=1)
        owners = [_owner(pods[:2], tuple(g[0][:32])) for g in groups]
        assert all(len(o) == 1 for o in owners), owners


def test_round_robin_splits_groups(stack_factory):
    settings = RouterSettings(served_names=("m",), policy="round_robin", stats_interval_s=0.1)
    with stack_factory(["prefill", "prefill", "decode"], settings) as (router, pods):
        sdk = _sdk(router)
        for g in _groups(2):
            for p in g:
                sdk.completions.create(model="m", prompt=p, max_tokens=1)
        assert len(pods[0].engine.prefills) == len(pods[1].engine.prefills) == 10


def test_kv_events_drive_the_index(stack_factory):
    """An eviction reported by a pod's event stream moves its prefix's traffic by load."""
    settings = RouterSettings(served_names=("m",), stats_interval_s=0.1, speculative_ttl_s=0.2)
    with stack_factory(["prefill", "prefill", "decode"], settings) as (router, pods):
        sdk = _sdk(router)
        (group,) = _groups(3, n=1, per=6)
        sdk.completions.create(model="m", prompt=group[0], max_tokens=1)
        (first,) = [p for p in pods[:2] if p.engine.prefills]
        other = next(p for p in pods[:2] if p is not first)
        time.sleep(0.3)  # speculative entries expired: only the events speak now
        for p in group[1:3]:
            sdk.completions.create(model="m", prompt=p, max_tokens=1)
        assert len(first.engine.prefills) == 3 and not other.engine.prefills
        first.engine.evict_all()
        time.sleep(0.3)
        # Now neither pod holds the prefix: ties rotate, so both pods get some of the next four.
        for p in group[2:6]:
            sdk.completions.create(model="m", prompt=p, max_tokens=1)
        assert other.engine.prefills


def test_session_header_pins_a_pod(stack_factory):
    settings = RouterSettings(served_names=("m",), policy="session", stats_interval_s=0.1)
    with stack_factory(["colocated", "colocated", "colocated"], settings) as (router, pods):
        for user in ("alice", "bob", "carol", "dave"):
            for k in range(3):
                r = httpx.post(
                    router.url + "/v1/completions",
                    json={"model": "m", "prompt": f"{user} turn {k} " * (k + 1), "max_tokens": 1},
                    headers={"x-session-id": user},
                )
                assert r.status_code == 200
        # Each user's three turns went to exactly one pod.
        per_pod = [len(p.engine.generates) for p in pods]
        assert sum(per_pod) == 12 and all(n % 3 == 0 for n in per_pod)


def test_incompatible_pods_are_never_paired():
    """Pairing uses the engines' own facts: a decode pod with another KV compatibility hash or
    another tokenizer is not a candidate, nor one with another rollout label."""
    from splitserve.proto import splitserve_pb2 as pb
    from splitserve.protocol.sampling import SamplingParams
    from splitserve.services.router.dispatch import Dispatcher, EngineRequest
    from splitserve.services.router.errors import NoBackendError
    from splitserve.services.router.pool import DECODE, PREFILL, Endpoint, PodState
    from splitserve.services.router.prefix_index import PrefixIndex
    from splitserve.services.router.retry import RetryBudget, RetryConfig

    class FakePool:
        def __init__(self, states):
            self.index = PrefixIndex()
            self.pods = {s.endpoint.pod_id: s for s in states}

        def ready(self, role):
            return [s for s in self.pods.values() if role in s.endpoint.roles]

    class NoClient:
        address = ""

    def state(addr, roles, kv, rollout="", tok="t1"):
        s = PodState(Endpoint(addr, frozenset(roles), rollout), NoClient())  # type: ignore[arg-type]
        s.info = pb.EngineInfo(kv_compat_hash=kv, tokenizer_id=tok, block_size=16)
        s.healthy = True
        return s

    pool = FakePool(
        [
            state("p1", {PREFILL}, "A", rollout="r1"),
            state("d1", {DECODE}, "B", rollout="r1"),  # other KV layout
            state("d2", {DECODE}, "A", rollout="r1"),
            state("d3", {DECODE}, "A", rollout="r2"),  # other version of the stack
            state("d4", {DECODE}, "A", rollout="r1", tok="t2"),  # other tokenizer
        ]
    )
    d = Dispatcher(pool, budget=RetryBudget(RetryConfig()))  # type: ignore[arg-type]
    req = EngineRequest("r", list(range(40)), SamplingParams(max_tokens=1), "t1")
    for _ in range(6):
        route = d.route(req)
        assert route.prefill.endpoint.address == "p1" and route.decode.endpoint.address == "d2"
    assert d.usable_tokenizers() == {"t1"}
    # Mid-rollout: a new prefill pod (hash C) with no decode partner yet is never chosen.
    pool.pods["p2"] = state("p2", {PREFILL}, "C")
    for _ in range(6):
        assert d.route(req).prefill.endpoint.address == "p1"
    # Nothing compatible at all: 503, not a mismatched pair.
    del pool.pods["d2"]
    with pytest.raises(NoBackendError):
        d.route(req)
    assert d.usable_tokenizers() == set()
