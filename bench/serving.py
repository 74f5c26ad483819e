"""Serving benchmark: the local stack through the OpenAI API, routing policies, router overhead.

Sections (each can be skipped):
  overhead  router overhead: p50 latency of a request through the router to instant fake pods,
            minus the same gRPC calls made directly (what the router adds per request).
  load      `splitserve serve` (1 prefill + 1 decode, and colocated; `--modes`) at concurrency
            1, 8, 32: TTFT p50/p99, inter-token latency p50/p99, output tok/s. Our own
            closed-loop client (N workers, each sends its next request when the previous one
            ends), streaming, `ignore_eos` so every request makes exactly --max-tokens tokens.
            `--quantizations gguf,w8a8` adds colocated runs with quantized weights.
  prefix    2 prefill pods + 1 decode pod, a shared-prefix workload (groups of requests sharing a
            1,000-token prefix, interleaved): prefix-aware vs round-robin routers over the same
            pods; TTFT and prefill tokens computed (prompt tokens minus prefix-cache hits, from
            the pods' /metrics).
  llama     the same `load` workload against llama.cpp's `llama-server` (continuous batching,
            one slot per concurrent request) on the same model requantized to BF16 (and, with
            `--llama-types BF16,Q8_0,Q4_0,Q4_1`, its quantized types), in the same run.

    .venv/bin/python -P bench/serving.py [--sections overhead,load,prefix,llama]
        [--llama-dir .cache/llama/.../build/bin] [--out bench-serving.json]
        [--dtype auto] [--quantizations gguf,w8a8] [--llama-types BF16,Q4_0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from splitserve.processes import free_port, spawn, stop

MODEL = "SmolLM2-135M-Instruct"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---- the client ---------------------------------------------------------------------------------


@dataclass
class Result:
    ttft_s: float
    latency_s: float
    tokens: int
    itl_s: float  # mean inter-token latency of this request


async def one_stream(
    http: httpx.AsyncClient, url: str, model: str, prompt, max_tokens: int
) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = None
    last = t0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter()
                    ttft = ttft if ttft is not None else now - t0
                    last = now
    end = time.perf_counter()
    n = tokens or max_tokens
    ttft = ttft if ttft is not None else end - t0
    itl = (last - t0 - ttft) / (n - 1) if n > 1 else 0.0
    return Result(ttft, end - t0, n, itl)


async def closed_loop(url: str, model: str, prompts: list, concurrency: int, max_tokens: int):
    queue = list(prompts)
    results: list[Result] = []
    # No keep-alive: llama-server closes idle connections after a few seconds and a reused one
    # then fails; a fresh loopback connection per request costs both servers the same ~0.1 ms.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def worker() -> None:
            while queue:
                prompt = queue.pop()
                results.append(await one_stream(http, url, model, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[Result], wall: float) -> dict:
    ttft = [r.ttft_s for r in results]
    itl = [r.itl_s for r in results]
    return {
        "requests": len(results),
        "ttft_p50_ms": 1000 * pct(ttft, 50),
        "ttft_p99_ms": 1000 * pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(itl, 50),
        "itl_p99_ms": 1000 * pct(itl, 99),
        "latency_p50_s": pct([r.latency_s for r in results], 50),
        "output_tok_s": sum(r.tokens for r in results) / wall,
        "wall_s": wall,
    }


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def text_prompts(n: int, words: int, seed: int) -> list[str]:
    """Plain-text prompts (llama-server and splitserve tokenize them the same way)."""
    rng = random.Random(seed)
    pool = [
        "time",
        "people",
        "year",
        "way",
        "day",
        "man",
        "thing",
        "woman",
        "life",
        "child",
        "world",
        "school",
        "state",
        "family",
        "student",
        "group",
        "country",
        "problem",
        "hand",
        "part",
        "place",
        "case",
        "week",
        "company",
        "system",
        "program",
        "question",
        "work",
        "government",
        "number",
        "night",
        "point",
        "home",
        "water",
        "room",
        "mother",
        "area",
        "money",
        "story",
    ]
    return [" ".join(rng.choice(pool) for _ in range(words)) for _ in range(n)]


# ---- processes ----------------------------------------------------------------------------------


class Proc:
    """A child (llama-server, or `splitserve ...`) that dies with the benchmark."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self.proc = spawn(cmd, env=env or dict(os.environ), output=log.open("w"))

    def stop(self) -> None:
        stop([self.proc], 30)


def serve(args: list[str], tmp: Path, name: str) -> tuple[Proc, str, dict[str, tuple[int, int]]]:
    import re

    port = free_port()
    cmd = [sys.executable, "-P", "-m", "splitserve", "serve", "--port", str(port), *args]
    p = Proc(cmd, tmp / f"{name}.log")
    deadline = time.monotonic() + 600
    while "ready at" not in p.log.read_text():
        if p.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(p.log.read_text()[-3000:])
        time.sleep(0.25)
    engines = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"(\w+-\d+) grpc:(\d+) metrics:(\d+)", p.log.read_text())
    }
    return p, f"http://127.0.0.1:{port}", engines


def wait_health(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{url} not healthy")


def scrape(metrics_port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name = key.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


# ---- sections -----------------------------------------------------------------------------------


def section_load(args, tmp: Path, colocated: bool, quantization: str = "") -> dict:
    flags = ["--kv-cache-memory-gb", "1", "--dtype", args.dtype]
    flags += ["--colocated", "--decode-replicas", "1"] if colocated else []
    flags += ["--quantization", quantization] if quantization else []
    flags += args.serve_args.split()
    name = variant_key(colocated, quantization)
    proc, url, _ = serve(flags, tmp, name)
    out = {}
    try:
        # Warm-up (first requests pay lazy init).
        asyncio.run(closed_loop(url, MODEL, text_prompts(2, 20, 0), 2, 4))
        for c in args.concurrency:
            n = max(args.min_requests, 2 * c)
            prompts = text_prompts(n, args.prompt_words, seed=c)
            out[c] = asyncio.run(closed_loop(url, MODEL, prompts, c, args.max_tokens))
            print(f"splitserve {name} c={c}: {out[c]}", flush=True)
    finally:
        proc.stop()
    return out


def variant_key(colocated: bool, quantization: str) -> str:
    """Result key of one splitserve run: "disagg" / "colocated" (unquantized, the keys older
    result files use), "colocated+gguf" ..."""
    base = "colocated" if colocated else "disagg"
    return f"{base}+{quantization}" if quantization else base


def section_llama(args, tmp: Path) -> dict:
    """{"<type>-t<threads>": {concurrency: result}} for each ``--llama-types`` x
    ``--llama-threads`` (older result files: {threads: ...}, BF16 only)."""
    return {
        f"{kind}-t{t}": _llama_run(args, tmp, t, kind)
        for kind in args.llama_types
        for t in args.llama_threads
    }


def llama_model(args, kind: str) -> Path:
    """The default model's GGUF as llama-server runs it: the packaged Q4_1 file itself, or
    requantized from it once with llama-quantize (BF16 holds the Q4_1 values exactly; Q8_0 and
    Q4_0 requantize them)."""
    from splitserve.engine.model.loader import default_gguf_path

    if kind == "Q4_1":
        return default_gguf_path()
    bin_dir = Path(args.llama_dir)
    path = Path(args.cache) / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(bin_dir / "llama-quantize"), "--allow-requantize", str(default_gguf_path()),
             str(path), kind],
            env=dict(os.environ, LD_LIBRARY_PATH=str(bin_dir)), check=True, capture_output=True,
        )  # fmt: skip
    return path


def _llama_run(args, tmp: Path, threads: int, kind: str = "BF16") -> dict:
    bin_dir = Path(args.llama_dir)
    server = bin_dir / "llama-server"
    if not server.exists():
        print(f"llama: no llama-server in {bin_dir}: skipped", flush=True)
        return {}
    gguf_file = llama_model(args, kind)
    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    port = free_port()
    slots = max(args.concurrency)
    cmd = [str(server), "-m", str(gguf_file), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-np", str(slots), "-c", str(768 * slots),
           "--alias", MODEL, "--threads-http", str(slots + 4)]  # fmt: skip
    p = Proc(cmd, tmp / f"llama-{kind}-t{threads}.log", env)
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        wait_health(url)
        time.sleep(1.0)  # /health can answer before every slot is set up
        asyncio.run(closed_loop(url, MODEL, text_prompts(2, 20, 0), 2, 4))
        for c in args.concurrency:
            n = max(args.min_requests, 2 * c)
            prompts = text_prompts(n, args.prompt_words, seed=c)
            out[c] = asyncio.run(closed_loop(url, MODEL, prompts, c, args.max_tokens))
            print(f"llama-server {kind} -t {threads} c={c}: {out[c]}", flush=True)
    except Exception:
        print(p.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        p.stop()
    return out


def section_prefix(args, tmp: Path) -> dict:
    flags = ["--prefill-replicas", "2", "--decode-replicas", "1", "--kv-cache-memory-gb", "0.5"]
    proc, url, engines = serve(flags, tmp, "prefix")
    prefill = sorted(n for n in engines if n.startswith("prefill"))
    pre_addr = ",".join(f"127.0.0.1:{engines[n][0]}" for n in prefill)
    dec_addr = ",".join(f"127.0.0.1:{engines[n][0]}" for n in engines if n.startswith("decode"))
    rr_port = free_port()
    rr = Proc(
        [sys.executable, "-P", "-m", "splitserve", "router", "--port", str(rr_port),
         "--policy", "round_robin", "--prefill-endpoints", pre_addr,
         "--decode-endpoints", dec_addr],
        tmp / "rr.log",
    )  # fmt: skip
    rr_url = f"http://127.0.0.1:{rr_port}"
    out = {}
    try:
        wait_health(rr_url)
        for name, u, seed in (("prefix", url, 1), ("round_robin", rr_url, 2)):
            rng = random.Random(seed)
            groups = [[rng.randrange(1000, 40000) for _ in range(1000)] for _ in range(args.groups)]
            # Shuffled (seeded), so a router must separate the groups itself. A fixed interleave
            # g0 g1 g2 g3 g0 ... would let round robin over 2 pods alias into perfect affinity.
            prompts = [
                groups[i % args.groups] + [rng.randrange(1000, 40000) for _ in range(16)]
                for i in range(args.groups * args.per_group)
            ]
            random.Random(7).shuffle(prompts)
            # Warm-up on both pods (lazy init), with prompts unrelated to the groups.
            asyncio.run(closed_loop(u, MODEL, random_prompts(4, 64, seed + 100), 2, 2))
            before = {n: scrape(engines[n][1]) for n in prefill}
            res = asyncio.run(closed_loop(u, MODEL, prompts, args.prefix_concurrency, 4))
            after = {n: scrape(engines[n][1]) for n in prefill}

            def delta(metric: str, a=after, b=before) -> float:
                return sum(a[n].get(metric, 0) - b[n].get(metric, 0) for n in prefill)

            q, h = delta("vllm:prefix_cache_queries_total"), delta("vllm:prefix_cache_hits_total")
            res["prompt_tokens"] = q
            res["prefill_tokens_computed"] = q - h
            res["hit_rate"] = h / q if q else float("nan")
            out[name] = res
            print(f"{name}: {res}", flush=True)
    finally:
        rr.stop()
        proc.stop()
    return out


def section_overhead(args) -> dict:
    """Router overhead against instant in-process fake pods (no model): what the router adds."""
    import grpc

    from splitserve.engine.model.loader import resolve_model
    from splitserve.proto import splitserve_pb2 as pb
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.protocol.tokenizer_files import read_tokenizer_files, tokenizer_id

    files = read_tokenizer_files(resolve_model(None))
    info = pb.EngineInfo(
        epoch=1, served_model_name="SmolLM2-135M-Instruct", max_model_len=8192, vocab_size=49152,
        block_size=16, kv_compat_hash="bench", tokenizer_id=tokenizer_id(files),
        tokenizer_files=[pb.TokenizerFile(name=n, content=c) for n, c in files],
    )  # fmt: skip

    class Instant(pb_grpc.PrefillServiceServicer, pb_grpc.DecodeServiceServicer,
                  pb_grpc.EngineServiceServicer):  # fmt: skip
        async def GetInfo(self, request, context):
            return info

        async def Prefill(self, request, context):
            return pb.PrefillResponse(
                first_tokens=[pb.FirstToken(token_id=100)],
                num_prompt_tokens=len(request.prompt_token_ids),
            )

        async def Generate(self, request, context):
            n = request.request.sampling_params.max_tokens
            for i in range(n):
                msg = pb.GenerateResponse(token_ids=[100], text=" a")
                if i == n - 1:
                    msg.finish_reason = pb.FINISH_REASON_LENGTH
                    msg.usage.CopyFrom(pb.Usage(prompt_tokens=1, completion_tokens=n))
                yield msg

        async def GetStats(self, request, context):
            return pb.EngineStats(epoch=1, block_size=16, serving=True)

        async def SubscribeKVEvents(self, request, context):
            await asyncio.Event().wait()
            yield pb.KVEventBatch()

    async def serve_fakes(ports: list[int], stop: asyncio.Event):
        servers = []
        for p in ports:
            s = grpc.aio.server()
            pb_grpc.add_PrefillServiceServicer_to_server(Instant(), s)
            pb_grpc.add_DecodeServiceServicer_to_server(Instant(), s)
            pb_grpc.add_EngineServiceServicer_to_server(Instant(), s)
            s.add_insecure_port(f"127.0.0.1:{p}")
            await s.start()
            servers.append(s)
        await stop.wait()
        for s in servers:
            await s.stop(None)

    async def direct(addr_p: str, addr_d: str, prompt_ids: list[int], n: int) -> list[float]:
        lat = []
        async with grpc.aio.insecure_channel(addr_p) as cp, grpc.aio.insecure_channel(addr_d) as cd:
            pre, dec = pb_grpc.PrefillServiceStub(cp), pb_grpc.DecodeServiceStub(cd)
            sp = pb.SamplingParams(max_tokens=8)
            for _ in range(n):
                t0 = time.perf_counter()
                req = pb.PrefillRequest(
                    request_id="x", prompt_token_ids=prompt_ids, sampling_params=sp
                )
                resp = await pre.Prefill(req)
                async for _ in dec.Generate(pb.GenerateRequest(request=req, prefill=resp)):
                    pass
                lat.append(time.perf_counter() - t0)
        return lat

    async def via_router(url: str, prompt: str, n: int) -> list[float]:
        lat = []
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 8}
            for _ in range(n):
                t0 = time.perf_counter()
                r = await http.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)
        return lat

    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stop = asyncio.Event()
    pp, dp = free_port(), free_port()
    asyncio.run_coroutine_threadsafe(serve_fakes([pp, dp], stop), loop)
    time.sleep(0.5)
    rport = free_port()
    with tempfile.TemporaryDirectory() as d:
        router = Proc(
            [sys.executable, "-P", "-m", "splitserve", "router", "--port", str(rport),
             "--prefill-endpoints", f"127.0.0.1:{pp}", "--decode-endpoints", f"127.0.0.1:{dp}"],
            Path(d) / "router.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{rport}"
        try:
            wait_health(url)
            from splitserve.engine.model.loader import resolve_model
            from splitserve.services.router.tokenizer import RouterTokenizer

            tok = RouterTokenizer(resolve_model(None))
            prompt = " ".join(["hello world"] * 64)  # ~128 tokens
            ids = tok.encode(prompt)
            asyncio.run(via_router(url, prompt, 20))  # warm-up
            r = asyncio.run(via_router(url, prompt, args.overhead_requests))
            g = asyncio.run(
                direct(f"127.0.0.1:{pp}", f"127.0.0.1:{dp}", ids, args.overhead_requests)
            )
        finally:
            router.stop()
    loop.call_soon_threadsafe(stop.set)
    out = {
        "prompt_tokens": len(ids),
        "router_p50_ms": 1000 * statistics.median(r),
        "router_p99_ms": 1000 * pct(r, 99),
        "direct_grpc_p50_ms": 1000 * statistics.median(g),
        "added_p50_ms": 1000 * (statistics.median(r) - statistics.median(g)),
    }
    print(f"overhead: {out}", flush=True)
    return out


def render_markdown(results: dict) -> str:
    """The tables docs/benchmarks.md shows, from a results dict."""
    lines = []
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            "| router overhead | p50 ms |",
            "|---|---|",
            f"| via the router (HTTP, routing, 2 gRPC hops) | {o['router_p50_ms']:.2f} |",
            f"| the same gRPC calls made directly, p50 | {o['direct_grpc_p50_ms']:.2f} |",
            f"| **added by the router, p50** | **{o['added_p50_ms']:.2f}** |",
            "",
        ]
    ours = [k for k in results if k.startswith(("disagg", "colocated")) and results[k]]
    rows = {k: results[k] for k in ours}
    for key, res in (results.get("llama_server") or {}).items():
        if res:  # "<type>-t<threads>", or just "<threads>" in older files (BF16)
            kind, _, t = key.rpartition("-t") if "-t" in key else ("BF16", "", key)
            rows[f"llama {kind} {t}"] = res
    dtype = (results.get("config") or {}).get("dtype", "bfloat16")

    def name_of(key: str) -> str:
        if key.startswith("llama"):
            _, kind, t = key.split()
            return f"llama-server {kind} -np 32 -t {t}"
        base, _, quant = key.partition("+")
        shape = "colocated (1 engine)" if base == "colocated" else "1 prefill + 1 decode"
        return f"splitserve {shape}, {quant or dtype}"

    systems = [(k, name_of(k)) for k in rows]
    if systems:
        lines += [
            "| system | concurrency | TTFT p50 / p99 ms | ITL p50 / p99 ms | output tok/s |",
            "|---|---|---|---|---|",
        ]
        for key, name in systems:
            for c, r in rows[key].items():
                lines.append(
                    f"| {name} | {c} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                    f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['output_tok_s']:.1f} |"
                )
        lines.append("")
        llama = [k for k in rows if k.startswith("llama")]
        bf16 = [k for k in llama if k.split()[1] == "BF16"]
        if llama:
            lines += [
                "| output tok/s ratio | concurrency | / best llama-server BF16 | "
                "/ best llama-server, any type |",
                "|---|---|---|---|",
            ]

            def best(keys: list[str], c: str) -> float | None:
                return max((rows[k][c]["output_tok_s"] for k in keys if c in rows[k]),
                           default=None)  # fmt: skip

            for key in ours:
                for c, r in rows[key].items():
                    b16, anyq = best(bf16, c), best(llama, c)
                    ratio = [f"{r['output_tok_s'] / b:.2f}" if b else "-" for b in (b16, anyq)]
                    lines.append(f"| {name_of(key)} | {c} | {ratio[0]} | {ratio[1]} |")
            lines.append("")
    if results.get("prefix"):
        lines += [
            "| policy | TTFT p50 / p99 ms | prompt tokens | prefill tokens computed | hit rate |",
            "|---|---|---|---|---|",
        ]
        for name, r in results["prefix"].items():
            lines.append(
                f"| {name} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                f"{r['prompt_tokens']:.0f} | {r['prefill_tokens_computed']:.0f} | "
                f"{100 * r['hit_rate']:.1f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default="overhead,load,prefix,llama")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=5)
    p.add_argument("--prefix-concurrency", type=int, default=4)
    p.add_argument("--overhead-requests", type=int, default=200)
    p.add_argument("--llama-dir", default="")
    p.add_argument("--llama-threads", default="1,2", help="llama-server -t values to run")
    p.add_argument("--llama-types", default="BF16",
                   help="GGUF types llama-server runs (BF16, Q8_0, Q4_0, Q4_1 ...)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", help="splitserve --dtype (auto, float32, ...)")
    p.add_argument("--quantizations", default="",
                   help="also run splitserve colocated with these --quantization values "
                   "(comma-separated, e.g. gguf,w8a8)")  # fmt: skip
    p.add_argument("--serve-args", default="",
                   help="more `splitserve serve` flags, e.g. '--threads-per-engine 1'")  # fmt: skip
    p.add_argument("--modes", default="disagg,colocated",
                   help="unquantized splitserve runs: disagg and/or colocated")  # fmt: skip
    p.add_argument("--cache", default=".cache/llama")
    p.add_argument("--out", default=None)
    p.add_argument("--render", default=None, help="print the markdown tables of a results JSON")
    args = p.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return 0
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every child process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.llama_threads = [int(t) for t in args.llama_threads.split(",")]
    args.llama_types = [t for t in args.llama_types.split(",") if t]
    quantizations = [q for q in args.quantizations.split(",") if q]
    modes = [m for m in args.modes.split(",") if m]
    sections = set(args.sections.split(","))
    results: dict = {"config": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "overhead" in sections:
            results["overhead"] = section_overhead(args)
        if "load" in sections:
            for mode in modes:
                results[mode] = section_load(args, tmp, colocated=mode == "colocated")
            for q in quantizations:
                results[variant_key(True, q)] = section_load(args, tmp, True, q)
        if "llama" in sections and args.llama_dir:
            results["llama_server"] = section_llama(args, tmp)
        if "prefix" in sections:
            results["prefix"] = section_prefix(args, tmp)
    text = json.dumps(results, indent=2, default=lambda o: asdict(o))
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print(render_markdown(json.loads(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
