"""The per-token path outside the engine: what a generated token costs after the engine drew it.

Two measurements, each at 1, 2 and 4 tokens per message (4 is what one step of speculative
decoding, or a consumer that fell behind and had its waiting deltas merged, hands over):

  decode    in process: the decode server's ``DecodeServicer._responses`` turning engine
            deltas into ``GenerateResponse`` messages (metrics included), plus their protobuf
            serialisation (what gRPC sends): CPU microseconds per token.
  router    a real router process over an in-process fake decode pod that streams a long
            completion as fast as gRPC lets it (no model): client-side tokens/s through
            streaming SSE (``/v1/completions`` and ``/v1/chat/completions``), and the router
            process's own CPU time per token (user + system, from /proc), i.e. gRPC receive,
            merging, SSE chunk building and HTTP.

    .venv/bin/python -P bench/token_path.py [--tokens 2000] [--repeats 3] [--out token-path.json]

The ratios (per-token cost at 1 token per message over the cost at k) are measured within the
run. Compare the absolute numbers with an engine step (docs/benchmarks.md): on a 2-core machine
the router shares the cores with the engines, so its CPU per token is taken from them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from splitserve.processes import free_port, spawn, stop

TOKENS_PER_MESSAGE = (1, 2, 4)
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WORDS = [" alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta"]


# ---- decode side: deltas -> GenerateResponse -> bytes -----------------------------------------


def bench_decode(tokens: int, per_message: int, repeats: int) -> float:
    """CPU microseconds per token of the decode server's message building + serialisation."""
    from prometheus_client import CollectorRegistry

    from splitserve.engine.outputs import SequenceDelta
    from splitserve.services.common.metrics import EngineMetrics
    from splitserve.services.decode.server import DecodeServicer

    metrics = EngineMetrics(CollectorRegistry(), engine=None, model_name="m", role="decode")
    servicer = DecodeServicer(engine=None, connector=None, metrics=metrics)  # type: ignore[arg-type]
    from splitserve.proto import splitserve_pb2 as pb
    from splitserve.protocol.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens)
    n_msgs = tokens // per_message
    deltas = [
        SequenceDelta(
            request_id="r",
            index=0,
            token_ids=tuple(range(100, 100 + per_message)),
            text="".join(WORDS[(i * per_message + j) % 8] for j in range(per_message)),
            logprobs=None,
            num_prompt_tokens=10,
            finish_reason="length" if i == n_msgs - 1 else None,
        )  # fmt: skip
        for i in range(n_msgs)
    ]

    async def source():
        for d in deltas:
            yield d

    async def run() -> float:
        t0 = time.process_time()
        async for msg in servicer._responses("r", source(), pb.KVTransferInfo(), 0.0, False,
                                             params):  # fmt: skip
            msg.SerializeToString()
        return time.process_time() - t0

    best = min(asyncio.run(run()) for _ in range(repeats))
    return 1e6 * best / (n_msgs * per_message)


# ---- router side: fake decode pod -> real router -> SSE client --------------------------------


def _fake_pod(tokens: int, per_message: int):
    import grpc

    from splitserve.engine.model.loader import resolve_model
    from splitserve.proto import splitserve_pb2 as pb
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.protocol.tokenizer_files import read_tokenizer_files, tokenizer_id
    from splitserve.services.router.tokenizer import RouterTokenizer

    files = read_tokenizer_files(resolve_model(None))
    tok = RouterTokenizer(resolve_model(None))
    ids = [tok.encode(w, False)[0] for w in WORDS]
    info = pb.EngineInfo(
        epoch=1, served_model_name=MODEL, max_model_len=1 << 20, vocab_size=49152,
        block_size=16, kv_compat_hash="bench", tokenizer_id=tokenizer_id(files), colocated=True,
        tokenizer_files=[pb.TokenizerFile(name=n, content=c) for n, c in files], role="decode",
    )  # fmt: skip
    # One stream's messages, made once: the pod costs the router nothing but the gRPC send.
    msgs = []
    for i in range(tokens // per_message):
        k = [i * per_message + j for j in range(per_message)]
        msgs.append(
            pb.GenerateResponse(
                token_ids=[ids[t % 8] for t in k], text="".join(WORDS[t % 8] for t in k)
            )
        )
    msgs[-1].finish_reason = pb.FINISH_REASON_LENGTH
    msgs[-1].usage.CopyFrom(pb.Usage(prompt_tokens=4, completion_tokens=tokens))

    class Pod(pb_grpc.DecodeServiceServicer, pb_grpc.EngineServiceServicer):
        async def GetInfo(self, request, context):
            return info

        async def Generate(self, request, context):
            for m in msgs:
                m.request_id = request.request.request_id
                yield m

        async def GetStats(self, request, context):
            return pb.EngineStats(epoch=1, block_size=16, serving=True)

        async def SubscribeKVEvents(self, request, context):
            await asyncio.Event().wait()
            yield pb.KVEventBatch()

    async def serve(port: int, stop_event: asyncio.Event) -> None:
        s = grpc.aio.server()
        pb_grpc.add_DecodeServiceServicer_to_server(Pod(), s)
        pb_grpc.add_EngineServiceServicer_to_server(Pod(), s)
        s.add_insecure_port(f"127.0.0.1:{port}")
        await s.start()
        await stop_event.wait()
        await s.stop(None)

    return serve


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream(url: str, chat: bool, tokens: int) -> tuple[int, int]:
    """(SSE events, characters of text) of one streamed request."""
    body: dict = {"model": MODEL, "max_tokens": tokens, "stream": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "hi"}]
    else:
        path, body["prompt"] = "/v1/completions", "hi"
    events = chars = 0
    async with (
        httpx.AsyncClient(timeout=120) as http,
        http.stream("POST", url + path, json=body) as r,
    ):
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events += 1
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                chars += len(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return events, chars


def bench_router(tokens: int, per_message: int, repeats: int, tmp: Path) -> dict:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stop_event = asyncio.Event()
    pod_port, router_port = free_port(), free_port()
    asyncio.run_coroutine_threadsafe(_fake_pod(tokens, per_message)(pod_port, stop_event), loop)
    time.sleep(0.5)
    cmd = [sys.executable, "-P", "-m", "splitserve", "router", "--port", str(router_port),
           "--colocated-endpoints", f"127.0.0.1:{pod_port}", "--log-level", "warning"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    router = spawn(cmd, env=env, output=(tmp / f"router-{per_message}.log").open("w"))
    url = f"http://127.0.0.1:{router_port}"
    out: dict = {"tokens_per_message": per_message}
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError((tmp / f"router-{per_message}.log").read_text()[-2000:])
            time.sleep(0.25)
        for chat in (False, True):
            asyncio.run(_stream(url, chat, tokens))  # warm-up
            walls, cpus, events = [], [], 0
            for _ in range(repeats):
                c0, t0 = _cpu_seconds(router.pid), time.perf_counter()
                events, chars = asyncio.run(_stream(url, chat, tokens))
                walls.append(time.perf_counter() - t0)
                cpus.append(_cpu_seconds(router.pid) - c0)
            kind = "chat" if chat else "completions"
            out[kind] = {
                "tokens_per_s": tokens / statistics.median(walls),
                "router_cpu_us_per_token": 1e6 * statistics.median(cpus) / tokens,
                "sse_events": events,
            }
    finally:
        stop([router], 15)
        loop.call_soon_threadsafe(stop_event.set)
    return out


def render_markdown(results: dict) -> str:
    lines = [
        "| tokens per message | decode server, CPU us/token | router CPU us/token, completions "
        "| router CPU us/token, chat | tok/s through the router, completions | tok/s, chat |",
        "|---|---|---|---|---|---|",
    ]
    for k in TOKENS_PER_MESSAGE:
        d, r = results["decode"][str(k)], results["router"][str(k)]
        lines.append(
            f"| {k} | {d:.1f} | {r['completions']['router_cpu_us_per_token']:.1f} "
            f"| {r['chat']['router_cpu_us_per_token']:.1f} "
            f"| {r['completions']['tokens_per_s']:.0f} | {r['chat']['tokens_per_s']:.0f} |"
        )
    one = results["router"]["1"]["completions"]["router_cpu_us_per_token"]
    four = results["router"]["4"]["completions"]["router_cpu_us_per_token"]
    lines.append(f"\nrouter CPU per token, 1 vs 4 tokens per message: {one / four:.2f}x")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per streamed request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results: dict = {"decode": {}, "router": {}}
    for k in TOKENS_PER_MESSAGE:
        results["decode"][str(k)] = bench_decode(args.tokens, k, args.repeats)
        print(f"decode, {k} tokens/message: {results['decode'][str(k)]:.1f} us/token", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for k in TOKENS_PER_MESSAGE:
            results["router"][str(k)] = bench_router(args.tokens, k, args.repeats, Path(d))
            print(f"router: {results['router'][str(k)]}", flush=True)
    print(render_markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
