"""Soak benchmark: mixed streaming load with client aborts against `splitserve serve`.

After one round of the largest requests from every client at once (``--no-prime`` skips it: it
brings each heap to its working set before the clock starts), for ``--minutes`` (default 10),
``--concurrency`` clients (default 8) send completions back to back:
prompts of 10-600 words, 16-128 output tokens, 90% streamed, and ``--abort-ratio`` (default 20%)
of them given up at a random moment (before the answer starts, mid-prefill, mid-decode). Every
2 s it samples each engine's KV usage and queues (GetStats) and the anonymous memory of every
process of the stack (``RssAnon`` + ``VmSwap``: what a leak grows, resident or swapped out). At
the end it checks that every engine went back to idle (nothing running, waiting, held or leased;
no unaccounted block) and reports:

- requests: completed, aborted on purpose, failed (an error status or a stream cut without
  ``[DONE]``; must be 0);
- anonymous memory of each process after warm-up and at the end, and slopes over the second half
  of the run after warm-up (MB/min): of the samples themselves; of the *floor* (at each sample,
  the least value over the 32 s before it, longer than the engines' 30-s heap-trim period: the
  level the heap comes back to); of the *high-water mark* (the most since warm-up); and the
  *leak slope*, the lesser of the last two. A heap that rises between trims moves the raw slope
  only; memory freed at once and partly taken again (the router lets go of 40 MB about a minute
  in) moves the floor, not the high-water mark; a leak moves both;
- KV usage over time; a plot (PNG) of RSS and KV usage per process when matplotlib is there.

    .venv/bin/python -P bench/soak.py [--minutes 10] [--out soak.json] [--plot soak.png]
        [--serve-args "--kv-transport nixl"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from splitserve.processes import free_port, spawn, splitserve_argv, stop
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

MODEL = "SmolLM2-135M-Instruct"
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "wizards", "quietly", "hex", "us",
)  # fmt: skip


@dataclass
class Tally:
    done: int = 0
    aborted: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


async def client_loop(url: str, deadline: float, rng: random.Random, tally: Tally, abort_ratio):
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        while time.monotonic() < deadline:
            stream = rng.random() < 0.9
            body = {
                "model": MODEL,
                "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 600))),
                "max_tokens": rng.choice([16, 32, 64, 128]),
                "stream": stream,
                "ignore_eos": True,
            }
            give_up = rng.uniform(0.0, 4.0) if rng.random() < abort_ratio else None
            try:
                await asyncio.wait_for(_one(http, url, body), give_up)
                tally.done += 1
            except TimeoutError:
                tally.aborted += 1
            except Exception as err:  # noqa: BLE001 - counted and reported
                tally.failed += 1
                tally.errors.append(f"{type(err).__name__}: {err}"[:300])


async def _one(http: httpx.AsyncClient, url: str, body: dict) -> None:
    if not body["stream"]:
        r = await http.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        last = ""
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                last = line
                if '"error"' in line:
                    raise RuntimeError(f"stream error: {line[:200]}")
        if last != "data: [DONE]":
            raise RuntimeError("stream ended without [DONE]")


def engine_stats(port: int) -> pb.EngineStats:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.EngineServiceStub(channel).GetStats(pb.StatsRequest(), timeout=5)


def rss_mb(pid: int, fields: tuple[str, ...] = ("RssAnon", "VmSwap")) -> float:
    """Memory of ``pid`` in MB: the sum of ``fields`` of /proc/<pid>/status. The default is the
    process's anonymous memory (heap and stacks: what a leak grows), resident or swapped out: the
    kernel swaps cold anonymous pages out on its own (kswapd, DAMON proactive reclaim), and
    ``RssAnon`` alone then falls by tens of MB and climbs back as the pages are touched again,
    which reads as growth. ``VmRSS`` adds file-backed pages (mapped libraries)."""
    kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            kb += int(value.split()[0])
    return kb / 1024


def children(pid: int) -> dict[str, int]:
    """role (prefill-0, decode-0, router) -> pid, from the processes `serve` started."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid != pid:
            continue
        args = [a.decode() for a in argv if a]
        if "--engine-id" in args:
            out[args[args.index("--engine-id") + 1]] = int(entry.name)
        elif "router" in args:
            out["router"] = int(entry.name)
    return out


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) over the second half of the (post warm-up) samples."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return 0.0
    xs, ys = [t for t, _ in half], [v for _, v in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


FLOOR_WINDOW_S = 32.0  # longer than the engines' 30-s heap-trim period (engine/heap.py)


def floor(samples: list[tuple[float, float]], window_s: float = FLOOR_WINDOW_S):
    """At each sample, the least value over the ``window_s`` before it: the level the heap comes
    back to after each trim. A heap that rises between trims leaves it flat; a leak raises it."""
    return [(t, min(v for u, v in samples if t - window_s <= u <= t)) for t, _ in samples]


def high_water(samples: list[tuple[float, float]]):
    """At each sample, the most value up to it: a leak keeps making new highs, a heap that
    frees memory and takes part of it back does not."""
    out, top = [], float("-inf")
    for t, v in samples:
        top = max(top, v)
        out.append((t, top))
    return out


def growth(samples: list[tuple[float, float]], warm_s: float) -> dict[str, float]:
    """The slopes (MB/min, second half after ``warm_s``) of one process's memory samples."""
    post = [(t, v) for t, v in samples if t >= warm_s]
    floor_slope = slope_mb_per_min([(t, v) for t, v in floor(samples) if t >= warm_s])
    high_slope = slope_mb_per_min(high_water(post))
    return {
        "slope_second_half_mb_per_min": round(slope_mb_per_min(post), 2),
        "floor_slope_second_half_mb_per_min": round(floor_slope, 2),
        "high_water_slope_second_half_mb_per_min": round(high_slope, 2),
        "leak_slope_mb_per_min": round(min(floor_slope, high_slope), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--abort-ratio", type=float, default=0.2)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-prime", dest="prime", action="store_false",
        help="skip the first round of largest requests (see prime())",
    )  # fmt: skip
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "serve.log"
    argv = splitserve_argv("serve", "--port", str(port), *shlex.split(args.serve_args))
    serve = spawn(argv, output=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        while "ready at" not in log.read_text():
            if serve.poll() is not None:
                print(log.read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        text = log.read_text()
        ports = {m[1]: int(m[2]) for m in re.finditer(r"(\w+-\d+) grpc:(\d+)", text)}
        procs = children(serve.pid)
        print(f"stack up: {procs}, engines {ports}; log {log}", flush=True)
        result = run_load(args, url, ports, procs)
    finally:
        stop([serve], 30)
    report(args, result)
    return 0 if result["requests"]["failed"] == 0 and result["idle_after"] else 1


async def prime(url: str, concurrency: int) -> None:
    """Every client at once sends the largest request the load will send (longest prompt, most
    output tokens), so each process's heap reaches its working set before the clock starts: growth
    after warm-up is then growth, not the first sight of the biggest step."""
    body = {"model": MODEL, "prompt": " ".join(WORDS[i % len(WORDS)] for i in range(600)),
            "max_tokens": 128, "stream": False, "ignore_eos": True}  # fmt: skip
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        await asyncio.gather(*(_one(http, url, body) for _ in range(concurrency)))


def run_load(args, url: str, ports: dict[str, int], procs: dict[str, int]) -> dict:
    if args.prime:
        asyncio.run(prime(url, args.concurrency))
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    tally = Tally()
    rss: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
    kv: dict[str, list[tuple[float, float]]] = {name: [] for name in ports}

    async def sampler() -> None:
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            for name, pid in procs.items():
                rss[name].append((now, rss_mb(pid)))
            for name, p in ports.items():
                s = await asyncio.to_thread(engine_stats, p)
                kv[name].append((now, 100.0 * s.kv_cache_usage))
            await asyncio.sleep(2.0)

    async def load() -> None:
        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency)]
        await asyncio.gather(
            sampler(),
            *(client_loop(url, deadline, r, tally, args.abort_ratio) for r in rngs),
        )

    asyncio.run(load())
    idle = wait_idle(ports)
    warm = args.warmup_s
    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "abort_ratio": args.abort_ratio,
        "serve_args": args.serve_args,
        "requests": {"done": tally.done, "aborted": tally.aborted, "failed": tally.failed},
        "errors": tally.errors[:20],
        "idle_after": idle,
        "rss_mb": {
            name: {
                "after_warmup": next((v for t, v in xs if t >= warm), xs[0][1] if xs else 0.0),
                "end": xs[-1][1] if xs else 0.0,
                **growth(xs, warm),
            }
            for name, xs in rss.items()
        },
        "kv_usage_pct": {
            name: {"max": max(v for _, v in xs), "mean": statistics.fmean(v for _, v in xs)}
            for name, xs in kv.items()
            if xs
        },
        "series": {"rss_mb": rss, "kv_usage_pct": kv},
    }


def wait_idle(ports: dict[str, int], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for p in ports.values():
            s = engine_stats(p)
            busy |= bool(
                s.num_requests_running or s.num_requests_waiting or s.num_active_leases
                or s.num_blocks_free != s.num_blocks_total or s.kv_blocks_unaccounted
            )  # fmt: skip
        if not busy:
            return True
        time.sleep(0.5)
    return False


def report(args, result: dict) -> None:
    summary = {k: v for k, v in result.items() if k != "series"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, xs in result["series"]["rss_mb"].items():
        top.plot([t / 60 for t, _ in xs], [v for _, v in xs], label=name)
    top.set_ylabel("anonymous RSS (MB)")
    top.legend(loc="upper left", fontsize="small")
    for name, xs in result["series"]["kv_usage_pct"].items():
        bottom.plot([t / 60 for t, _ in xs], [v for _, v in xs], label=name)
    bottom.set_ylabel("KV usage (%)")
    bottom.set_xlabel("minutes")
    bottom.legend(loc="upper left", fontsize="small")
    r = result["requests"]
    fig.suptitle(
        f"soak: {result['concurrency']} clients, {int(100 * result['abort_ratio'])}% aborts; "
        f"{r['done']} done, {r['aborted']} aborted, {r['failed']} failed"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
