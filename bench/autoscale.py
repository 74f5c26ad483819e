"""Autoscaling benchmark: a load profile against an autoscaled InferenceService on the local
cluster; replicas per role over time (PNG), SLO attainment, failed requests (must be 0).

It needs the local cluster up with the node agent (``scripts/cluster up``; docs/testing.md).
Then it does what the end-to-end fixtures do: refreshes the image from this checkout, stages the
default model, installs the operator from its chart (``--autoscale-interval`` as given), and
creates a namespace with the model claim and an InferenceService whose prefill and decode pools
are autoscaled by the operator (decode on concurrency, prefill on queue depth; decode may reach
``--max-decode``). Clients stream completions (``ignore_eos``, ``--max-tokens`` each) back to
back, their number following the profile:

    warm  2 clients, 30 s | ramp 2 -> 8, one more every 15 s | burst 12, 45 s | idle 0, 150 s
    | burst 6, 30 s | idle 0, 90 s

Every 2 s it samples the InferenceService's status (the autoscaler's replicas per role, ready
pods per role). Each request records its time to first token, its mean inter-token latency, its
token count and any error. SLO attainment is the share of requests with TTFT <= ``--slo-ttft``
and mean ITL <= ``--slo-itl``; a request that failed, or lost a token, counts as failed.

    .venv/bin/python -P bench/autoscale.py [--out autoscale.json] [--plot docs/img/autoscale.png]
        [--keep] [--time-scale 1.0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai

from splitserve.cluster.load import Clients, Streamed

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2"
OPERATOR_NS, OPERATOR_RELEASE = "splitserve-e2e", "splitserve-operator"
GROUP, VERSION, PLURAL = "serving.splitserve.io", "v1alpha1", "inferenceservices"
PROMPTS = ("1, 2, 3, 4,", "A, B, C, D, E,", "1 2 3 4 5 6", "5, 6, 7, 8,")
# (phase, clients at its start, clients at its end, seconds)
PROFILE = (
    ("warm", 2, 2, 30),
    ("ramp", 2, 8, 90),
    ("burst", 12, 12, 45),
    ("idle", 0, 0, 150),
    ("burst", 6, 6, 30),
    ("idle", 0, 0, 90),
)


@dataclass
class Sample:
    t: float
    clients: int
    inflight: int
    replicas: dict[str, int | None] = field(default_factory=dict)  # the autoscaler's
    ready: dict[str, int] = field(default_factory=dict)  # ready pods per role


def tool(name: str, *args: str, kubeconfig: Path, timeout: float = 600) -> str:
    env = os.environ | {"KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(
        [str(REPO / ".cache" / "tools" / name), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{name} {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


def prepare(kubeconfig: Path, autoscale_interval: float) -> Path:
    """Image, model and operator, as the end-to-end fixtures prepare them; the model dir."""
    from splitserve.cluster import image, models

    built = image.build()
    model_dir = models.stage()
    tool(
        "helm", "upgrade", "--install", OPERATOR_RELEASE,
        str(REPO / "charts" / "splitserve-operator"), "-n", OPERATOR_NS, "--create-namespace",
        "--set", "reconcileInterval=5", "--set", f"autoscaleInterval={autoscale_interval:g}",
        "--set-string", f"podAnnotations.splitserve\\.test/image-id={built.id[:12]}",
        "--wait", "--timeout", "5m", kubeconfig=kubeconfig,
    )  # fmt: skip
    return model_dir


def isvc_body(args: argparse.Namespace) -> dict:
    from splitserve.cluster import models

    window = {"stabilizationSeconds": args.scale_down_window}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"uri": f"pvc://{models.DEFAULT_CLAIM}/{models.DEFAULT_MODEL}",
                      "servedName": MODEL},
            "image": "ghcr.io/splitserve/splitserve:0.1.0",
            "engine": {"dtype": "bfloat16", "maxModelLen": 512, "maxNumSeqs": 16,
                       "extraArgs": ["--kv-cache-memory-gb", "0.25"]},
            "prefill": {"replicas": 1, "autoscaling": {
                "minReplicas": 1, "maxReplicas": 2, "targets": {"queueDepth": 2},
                "scaleDown": window}},
            "decode": {"replicas": 1, "autoscaling": {
                "minReplicas": 1, "maxReplicas": args.max_decode,
                "targets": {"concurrency": args.concurrency_target}, "scaleDown": window}},
            "autoscaling": {"policy": "Independent", "maxPrefillPerDecode": 1},
            "router": {"replicas": 1, "policy": "least_load"},
            "kvTransfer": {"transport": "grpc"},
            "drainSeconds": 120,
        },
    }  # fmt: skip


def sample(custom, ns: str, t0: float, load: Clients) -> Sample:
    status = (
        custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "bench").get("status") or {}
    )
    auto = status.get("autoscaling") or {}
    return Sample(
        t=time.monotonic() - t0,
        clients=load.target,
        inflight=load.inflight,
        replicas={r: (auto.get(r) or {}).get("replicas") for r in ("prefill", "decode")},
        ready={
            r: int((status.get(r) or {}).get("readyReplicas") or 0) for r in ("prefill", "decode")
        },  # fmt: skip
    )


def run_profile(load: Clients, scale: float, on_tick) -> None:
    for _phase, start, end, seconds in PROFILE:
        seconds *= scale
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < seconds:
            clients = round(start + (end - start) * elapsed / seconds)
            load.set_clients(clients)
            on_tick()
            time.sleep(1.0)


def plot(samples: list[Sample], requests: list[Streamed], t0: float, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    t = [s.t for s in samples]
    top.step(t, [s.clients for s in samples], where="post", label="clients", color="grey")
    top.plot(t, [s.inflight for s in samples], label="requests in flight", color="black")
    top.set_ylabel("load")
    top.legend(loc="upper right")
    for role, color in (("decode", "tab:blue"), ("prefill", "tab:orange")):
        mid.step(t, [s.replicas.get(role) or 0 for s in samples], where="post", color=color,
                 label=f"{role}: autoscaler")  # fmt: skip
        mid.plot(t, [s.ready[role] for s in samples], color=color, linestyle=":",
                 label=f"{role}: ready pods")  # fmt: skip
    mid.set_ylabel("replicas")
    mid.legend(loc="upper right")
    ok = [r for r in requests if r.complete(args.max_tokens) and r.ttft is not None]
    low.scatter([r.began - t0 for r in ok], [r.ttft for r in ok], s=6, label="TTFT")
    low.axhline(args.slo_ttft, color="red", linestyle="--", label="TTFT objective")
    failed = [r for r in requests if not r.complete(args.max_tokens)]
    if failed:
        low.scatter([r.began - t0 for r in failed], [0] * len(failed), marker="x", color="red",
                    label="failed")  # fmt: skip
    low.set_ylabel("seconds")
    low.set_xlabel("time (s)")
    low.legend(loc="upper right")
    fig.suptitle("splitserve autoscaling: load profile, replicas per role, TTFT")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="autoscale.json")
    p.add_argument("--plot", default="autoscale.png")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-decode", type=int, default=3)
    p.add_argument("--concurrency-target", type=float, default=3.0)
    p.add_argument("--scale-down-window", type=int, default=60)
    p.add_argument("--autoscale-interval", type=float, default=5.0)
    p.add_argument("--slo-ttft", type=float, default=3.0)
    p.add_argument("--slo-itl", type=float, default=0.5)
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch (>1) or shrink phases")
    p.add_argument("--keep", action="store_true", help="leave the namespace behind")
    args = p.parse_args()

    from kubernetes import client
    from kubernetes import config as kube_config

    from splitserve.cluster import models
    from splitserve.cluster.controlplane.layout import Layout

    kubeconfig = Layout.for_checkout(REPO).admin_kubeconfig
    if not kubeconfig.exists():
        raise SystemExit("no local cluster: run `scripts/cluster up` first (docs/testing.md)")
    model_dir = prepare(kubeconfig, args.autoscale_interval)
    api = kube_config.new_client_from_config(config_file=str(kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    pv, pvc = models.volume_manifests(ns, model_dir.parent)
    core.create_persistent_volume(pv)
    core.create_namespaced_persistent_volume_claim(ns, pvc)
    try:
        return run(args, core, custom, ns)
    finally:
        if not args.keep:
            with contextlib.suppress(Exception):
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "bench")
                time.sleep(10)
            with contextlib.suppress(Exception):
                core.delete_namespace(ns)
            with contextlib.suppress(Exception):
                core.delete_persistent_volume(pv.metadata.name)


def run(args, core, custom, ns: str) -> int:
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, isvc_body(args))
    deadline = time.monotonic() + 900
    while True:  # the operator creates the router's Service on its first pass
        found = subprocess.run(
            [str(REPO / "scripts" / "cluster"), "url", f"{ns}/bench"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if found.returncode == 0:
            url = found.stdout.strip()
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"no router Service: {found.stderr.strip()}")
        time.sleep(2)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    while True:  # serving: the pools came up and the router found them
        with contextlib.suppress(Exception):
            sdk.completions.create(model=MODEL, prompt="1", max_tokens=1)
            break
        if time.monotonic() > deadline:
            raise SystemExit("the InferenceService never served")
        time.sleep(2)
    load = Clients(sdk, MODEL, PROMPTS, args.max_tokens)
    samples: list[Sample] = []
    t0 = time.monotonic()
    last = [0.0]

    def tick() -> None:
        if time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            with contextlib.suppress(Exception):
                samples.append(sample(custom, ns, t0, load))

    try:
        run_profile(load, args.time_scale, tick)
    finally:
        load.stop()
    events = [
        {"reason": e.reason, "message": e.message,
         "time": str(e.last_timestamp or e.event_time or "")}
        for e in core.list_namespaced_event(ns, field_selector="involvedObject.name=bench").items
        if e.reason.startswith("Scaled")
    ]  # fmt: skip
    reqs = load.results
    failed = [r for r in reqs if not r.complete(args.max_tokens)]
    good = [
        r for r in reqs
        if r.complete(args.max_tokens) and r.ttft is not None and r.ttft <= args.slo_ttft
        and (r.itl is None or r.itl <= args.slo_itl)
    ]  # fmt: skip
    ttfts = sorted(r.ttft for r in reqs if r.ttft is not None)
    summary = {
        "requests": len(reqs),
        "failed": len(failed),
        "failures": [
            r.error or f"stream cut: {r.tokens} of {args.max_tokens} tokens, finish {r.finish}"
            for r in failed[:10]
        ],
        "slo": {
            "ttft_s": args.slo_ttft,
            "itl_s": args.slo_itl,
            "attainment": round(len(good) / max(1, len(reqs)), 4),
        },  # fmt: skip
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 3) if ttfts else None,
        "max_replicas": {
            r: max((s.replicas.get(r) or 0) for s in samples) for r in ("prefill", "decode")
        },  # fmt: skip
        "final_replicas": samples[-1].replicas if samples else {},
        "scaling_events": events,
        "profile": [list(p) for p in PROFILE],
        "args": vars(args),
    }
    Path(args.out).write_text(
        json.dumps(summary | {"samples": [asdict(s) for s in samples]}, indent=1)
    )
    with contextlib.suppress(ImportError):
        plot(samples, reqs, t0, args, Path(args.plot))
    print(json.dumps(summary, indent=1))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
