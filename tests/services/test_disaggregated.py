"""Prefill on one process, decode on another: exact outputs over both KV transports, safe
hand-offs under faults, and full pools after every scenario."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from splitserve import LLM, SamplingParams
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.wire import params_to_proto

pytestmark = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    " ".join(["Paged attention keeps the KV cache in fixed-size blocks."] * 6),
    "1, 2, 3, 4,",
    "Q: What is 12 times 12?\nA:",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def reference():
    llm = LLM(dtype="float32", num_kv_blocks=160)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    outs = llm.generate(PROMPTS, params)
    return llm, {
        o.prompt: (o.prompt_token_ids, o.outputs[0].token_ids, o.outputs[0].text) for o in outs
    }


def request(rid: str, token_ids: list[int]) -> pb.PrefillRequest:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    return pb.PrefillRequest(
        request_id=rid, prompt_token_ids=token_ids, sampling_params=params_to_proto(params)
    )


async def run_one(prefill_addr, decode_addr, req, prefill_resp=None):
    async with (
        grpc.aio.insecure_channel(prefill_addr) as pch,
        grpc.aio.insecure_channel(decode_addr) as dch,
    ):
        if prefill_resp is None:
            prefill_resp = await pb_grpc.PrefillServiceStub(pch).Prefill(req, timeout=60)
        messages = [
            m
            async for m in pb_grpc.DecodeServiceStub(dch).Generate(
                pb.GenerateRequest(request=req, prefill=prefill_resp), timeout=120
            )
        ]
    return prefill_resp, messages


def collect(messages):
    tokens = [t for m in messages for t in m.token_ids]
    return tokens, "".join(m.text for m in messages), messages[0].kv_transfer, messages[-1]


@pytest.mark.parametrize("decode", ["decode_nixl", "decode_grpc"])
def test_disaggregated_output_equals_single_engine(servers, reference, decode):
    _, ref = reference
    prefill, dec = servers["prefill"], servers[decode]
    for i, prompt in enumerate(PROMPTS):
        ids, expected_tokens, expected_text = ref[prompt]
        resp, messages = asyncio.run(
            run_one(prefill.address, dec.address, request(f"{decode}-{i}", ids))
        )
        tokens, text, transfer, last = collect(messages)
        assert tokens == expected_tokens, prompt
        assert text == expected_text
        assert not transfer.recomputed, transfer.failure_reason
        if transfer.num_blocks:  # blocks the decode pod had cached locally are not moved
            assert transfer.transport == ("nixl" if decode == "decode_nixl" else "grpc")
            assert transfer.num_bytes > 0
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(ids)
        assert last.usage.completion_tokens == MAX_TOKENS
    for server in servers.values():
        server.wait_pool_full()


def test_32_concurrent_requests(servers, reference):
    _, ref = reference
    prefill = servers["prefill"]
    decodes = [servers["decode_nixl"], servers["decode_grpc"]]

    async def main():
        jobs = []
        for i in range(32):
            prompt = PROMPTS[i % len(PROMPTS)]
            req = request(f"conc-{i}", ref[prompt][0])
            jobs.append(run_one(prefill.address, decodes[i % 2].address, req))
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for i, (_, messages) in enumerate(results):
        tokens, _, transfer, _ = collect(messages)
        assert tokens == ref[PROMPTS[i % len(PROMPTS)]][1]
        assert not transfer.recomputed
    # the shared prompts hit the prefill pod's prefix cache
    assert prefill.stats().prefix_cache_hits > 0
    for server in servers.values():
        server.wait_pool_full()


def test_colocated_pod_runs_the_prompt_itself(servers, reference):
    _, ref = reference
    ids, expected, _ = ref[PROMPTS[2]]

    async def main():
        async with grpc.aio.insecure_channel(servers["decode_grpc"].address) as ch:
            req = pb.GenerateRequest(request=request("colo", ids))
            return [m async for m in pb_grpc.DecodeServiceStub(ch).Generate(req, timeout=60)]

    tokens, _, transfer, _ = collect(asyncio.run(main()))
    assert tokens == expected and transfer.transport == ""


def test_unreleased_lease_expires_and_blocks_return(servers, reference):
    _, ref = reference
    prefill = servers["prefill"]
    with grpc.insecure_channel(prefill.address) as ch:
        resp = pb_grpc.PrefillServiceStub(ch).Prefill(request("orphan", ref[PROMPTS[3]][0]))
    assert resp.handoff.block_ids
    held = prefill.stats()
    assert held.num_active_leases == 1 and held.num_blocks_free < held.num_blocks_total
    time.sleep(5.5)  # the module's prefill pod leases for 5 s
    prefill.wait_pool_full(timeout=3)
    # a decode pod handed the expired lease recomputes and still answers correctly
    _, messages = asyncio.run(
        run_one(
            prefill.address,
            servers["decode_grpc"].address,
            request("orphan", ref[PROMPTS[3]][0]),
            resp,
        )
    )
    tokens, _, transfer, _ = collect(messages)
    assert tokens == ref[PROMPTS[3]][1]
    assert transfer.recomputed and "lease" in transfer.failure_reason


def test_decode_abort_releases_everything(servers, reference):
    _, ref = reference
    prefill, dec = servers["prefill"], servers["decode_nixl"]
    ids = ref[PROMPTS[0]][0]

    async def main():
        async with (
            grpc.aio.insecure_channel(prefill.address) as pch,
            grpc.aio.insecure_channel(dec.address) as dch,
        ):
            req = pb.PrefillRequest(
                request_id="abort-me",
                prompt_token_ids=ids,
                sampling_params=params_to_proto(SamplingParams(max_tokens=500, ignore_eos=True)),
            )
            resp = await pb_grpc.PrefillServiceStub(pch).Prefill(req)
            call = pb_grpc.DecodeServiceStub(dch).Generate(
                pb.GenerateRequest(request=req, prefill=resp)
            )
            got = 0
            async for _ in call:
                got += 1
                if got == 3:
                    call.cancel()
                    break
            return got

    assert asyncio.run(main()) == 3
    dec.wait_pool_full(timeout=5)
    prefill.wait_pool_full(timeout=5)


def test_incompatible_peer_is_refused_at_handshake(servers):
    from splitserve.kvtransfer.errors import IncompatiblePeerError
    from splitserve.kvtransfer.pool import allocate_kv_pool
    from splitserve.kvtransfer.puller import KVPuller
    from splitserve.protocol.kv_compat import CompatInfo as Compat

    stats = servers["prefill"].stats()
    kv = allocate_kv_pool(4, 30, 32, 3, 64, __import__("torch").float32)
    compat = Compat(
        model=stats.model, revision="", dtype="float32", block_size=32, num_layers=30,
        num_kv_heads=3, head_dim=64,
    )  # fmt: skip
    puller = KVPuller(kv, compat, "stranger", transports=("grpc",))
    try:
        with pytest.raises(IncompatiblePeerError, match="block_size"):
            puller.handshake(servers["prefill"].address)
    finally:
        puller.close()


def test_prefill_killed_or_restarted_requests_still_complete(servers, reference, tmp_path):
    _, ref = reference
    dec = servers["decode_grpc"]
    ids, expected, _ = ref[PROMPTS[3]]
    victim = type(servers["prefill"])("prefill", ["--kv-transport", "grpc"], tmp_path / "v.log")
    victim.start()
    try:
        with grpc.insecure_channel(victim.address) as ch:
            stub = pb_grpc.PrefillServiceStub(ch)
            req1 = request("victim-1", ids)
            handoff1 = stub.Prefill(req1)
        victim.kill()  # the source dies before the decode pod reads
        _, messages = asyncio.run(run_one(victim.address, dec.address, req1, handoff1))
        tokens, _, transfer, _ = collect(messages)
        assert tokens == expected
        assert transfer.recomputed
        # restarted on the same port: a new epoch, so the old hand-off must be refused
        victim.start()
        req2 = request("victim-2", ids)
        _, messages = asyncio.run(run_one(victim.address, dec.address, req2, handoff1))
        tokens, _, transfer, _ = collect(messages)
        assert tokens == expected
        assert transfer.recomputed and "epoch" in transfer.failure_reason
        victim.wait_pool_full()
    finally:
        victim.stop()
    dec.wait_pool_full()


# vLLM's metric set (names and types as vLLM's v1 Prometheus logger and NIXL connector define
# them: vllm/v1/metrics/loggers.py, docs/usage/metrics.md), every one on both engine roles.
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_max_num_generation_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram",
}
NIXL_METRICS = {
    "vllm:nixl_xfer_time_seconds": "histogram",
    "vllm:nixl_bytes_transferred": "histogram",
    "vllm:nixl_num_descriptors": "histogram",
    "vllm:nixl_num_failed_transfers": "counter",
    "vllm:nixl_num_kv_expired_reqs": "counter",
}


def scrape(server) -> dict:
    """family name -> family, from the server's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    """The sum of ``sample`` (default: the family's own name) over samples matching ``labels``."""
    fam = families.get(name)
    if fam is None:
        return 0.0
    want = sample or name
    return sum(
        s.value
        for s in fam.samples
        if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_both_pods_export_vllms_metric_set(servers):
    for role in ("prefill", "decode_nixl"):
        families = scrape(servers[role])
        for name, kind in {**VLLM_METRICS, **NIXL_METRICS}.items():
            assert name in families, f"{role}: {name} missing"
            assert families[name].type == kind, f"{role}: {name} is {families[name].type}"
        for name in VLLM_METRICS:  # vLLM's label convention
            for s in families[name].samples:
                assert {"model_name", "engine"} <= set(s.labels) or name.endswith("_info"), s
        info = families["vllm:cache_config_info"].samples[0].labels
        assert info["block_size"] == "16" and info["enable_prefix_caching"] == "true"
        if role == "prefill":  # the transfer family of its own, beside vLLM's
            assert "splitserve:kv_leases_granted" in families


def test_each_token_and_request_is_counted_once_across_the_pair(servers, reference):
    """Prompt tokens on the prefill pod, generated tokens and the request on the decode pod."""
    _, ref = reference
    prefill, dec = servers["prefill"], servers["decode_nixl"]
    ids = ref[PROMPTS[3]][0] + [42, 43, 44]  # a fresh prompt: its blocks must move
    before = {"p": scrape(prefill), "d": scrape(dec)}
    _, messages = asyncio.run(run_one(prefill.address, dec.address, request("counted", ids)))
    tokens, _, transfer, _ = collect(messages)
    after = {"p": scrape(prefill), "d": scrape(dec)}

    def delta(pod, name, sample=None, **labels):
        return value(after[pod], name, sample, **labels) - value(
            before[pod], name, sample, **labels
        )

    assert len(tokens) == MAX_TOKENS
    assert delta("p", "vllm:prompt_tokens", "vllm:prompt_tokens_total") == len(ids)
    assert delta("d", "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 0
    assert delta("p", "vllm:generation_tokens", "vllm:generation_tokens_total") == 0
    assert delta("d", "vllm:generation_tokens", "vllm:generation_tokens_total") == MAX_TOKENS
    success = "vllm:request_success_total"
    assert delta("d", "vllm:request_success", success, finished_reason="length") == 1
    assert delta("p", "vllm:request_success", success) == 0
    for name in ("vllm:e2e_request_latency_seconds", "vllm:request_decode_time_seconds"):
        assert delta("d", name, name + "_count") == 1, name
        assert delta("p", name, name + "_count") == 0, name
    # each pod's own view of the queue and the prompt (the decode pod's is the KV import)
    for pod in ("p", "d"):
        for name in ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds"):
            assert delta(pod, name, name + "_count") == 1, (pod, name)
    assert delta("d", "vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == len(ids)
    assert delta("d", "vllm:inter_token_latency_seconds",
                 "vllm:inter_token_latency_seconds_count") == MAX_TOKENS - 1  # fmt: skip
    assert delta("p", "vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") >= len(
        ids
    ) - 16 * (len(ids) // 16)  # at least the tokens it computed past any cached blocks
    assert transfer.num_blocks > 0 and transfer.transport == "nixl"
    xfer = "vllm:nixl_xfer_time_seconds"
    assert delta("d", xfer, xfer + "_count", transport="nixl") == 1
    moved = delta("d", "vllm:nixl_bytes_transferred", "vllm:nixl_bytes_transferred_sum")
    assert moved == transfer.num_bytes
    for server in servers.values():
        server.wait_pool_full()


def test_kv_events_carry_the_shared_block_hashes(servers, reference):
    """A router hashing the prompt with block_hash.py finds exactly the engine's stored blocks."""
    from splitserve.protocol.block_hash import hash_prompt_blocks

    prefill = servers["prefill"]
    prompt = list(range(2000, 2000 + 16 * 3 + 5))  # 3 full blocks + a partial one

    async def main():
        async with grpc.aio.insecure_channel(prefill.address) as ch:
            events = pb_grpc.EngineServiceStub(ch).SubscribeKVEvents(
                pb.SubscribeKVEventsRequest(snapshot=True)
            )
            first = await events.read()  # the snapshot comes first
            assert first.snapshot and first.events[0].HasField("cleared")
            req = request("events", prompt)
            resp = await pb_grpc.PrefillServiceStub(ch).Prefill(req)
            stored: list[int] = []
            while len(stored) < 3:
                batch = await asyncio.wait_for(events.read(), timeout=10)
                assert batch.sequence > first.sequence and batch.epoch == first.epoch
                for ev in batch.events:
                    if ev.HasField("stored"):
                        stored.extend(ev.stored.block_hashes)
            events.cancel()
            release = pb.ReleaseRequest(
                lease=pb.LeaseRef(
                    lease_id=resp.handoff.lease_id,
                    engine_id=resp.handoff.engine_id,
                    epoch=resp.handoff.epoch,
                )
            )
            await pb_grpc.KVServiceStub(ch).Release(release)
            return stored

    stored = asyncio.run(main())
    assert stored == hash_prompt_blocks(prompt, 16)
    prefill.wait_pool_full()
