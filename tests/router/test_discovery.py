"""Discovery: static lists, EndpointSlice -> endpoints (pure), and the watch against kmock."""

from __future__ import annotations

import asyncio
import contextlib
import copy

import kmock
import pytest

from splitserve.operator import labels as L
from splitserve.protocol.labels import ROLLOUT_HASH_LABEL
from splitserve.services.router.discovery import (
    KubeAccess,
    KubernetesDiscovery,
    merge_roles,
    parse_addresses,
    selector_matches,
    slice_endpoints,
    static_endpoints,
)
from splitserve.services.router.pool import DECODE, PREFILL

NS = "ml"
PREFILL_SEL = f"{L.INSTANCE_LABEL}=chat,{L.ROLE_LABEL}=prefill"
DECODE_SEL = f"{L.INSTANCE_LABEL}=chat,{L.ROLE_LABEL}=decode"


def test_parse_and_static():
    assert parse_addresses(" a:1, b:2 ,,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        parse_addresses("nohost")
    eps = {e.address: e.roles for e in static_endpoints(["a:1"], ["b:2", "a:1"], ["c:3"])}
    assert eps == {
        "a:1": {PREFILL, DECODE},
        "b:2": {DECODE},
        "c:3": {PREFILL, DECODE},
    }


def pod(name: str, compat: str) -> dict:
    return {"metadata": {"name": name, "namespace": NS, "labels": {ROLLOUT_HASH_LABEL: compat}}}


def endpoint_slice(name: str, role: str, endpoints: list[tuple[str, str, dict]]) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": {
                L.INSTANCE_LABEL: "chat",
                L.ROLE_LABEL: role,
                "kubernetes.io/service-name": f"chat-{role}",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50051}],
        "endpoints": [
            {"addresses": [ip], "conditions": cond, "targetRef": {"kind": "Pod", "name": pname}}
            for ip, pname, cond in endpoints
        ],
    }


READY = {"ready": True}


def test_slice_endpoints_keeps_ready_and_terminating_pods_with_known_labels():
    s = endpoint_slice(
        "s1",
        "prefill",
        [
            ("10.0.0.1", "p1", READY),
            ("10.0.0.2", "p2", {"ready": False}),
            ("10.0.0.3", "p3", {"ready": True, "terminating": True}),
            ("10.0.0.4", "p4", {}),  # unknown readiness counts as ready
            ("10.0.0.5", "p5", READY),  # its Pod is not read yet: skipped
        ],
    )
    pods = {n: pod(n, "h1") for n in ("p1", "p2", "p3", "p4")}
    eps = slice_endpoints([s], pods, frozenset({PREFILL}))
    # Terminating (p3): kept, draining, so the streams already on it finish there.
    assert sorted((e.address, e.draining) for e in eps) == [
        ("10.0.0.1:50051", False),
        ("10.0.0.3:50051", True),
        ("10.0.0.4:50051", False),
    ]
    assert {e.rollout_hash for e in eps} == {"h1"}
    assert {e.name for e in eps} == {"p1", "p3", "p4"}


def test_merge_roles_makes_colocated():
    a = slice_endpoints(
        [endpoint_slice("a", "prefill", [("10.0.0.1", "x", READY)])],
        {"x": pod("x", "h")},
        frozenset({PREFILL}),
    )
    b = slice_endpoints(
        [endpoint_slice("b", "decode", [("10.0.0.1", "x", READY)])],
        {"x": pod("x", "h")},
        frozenset({DECODE}),
    )
    (merged,) = merge_roles(a, b)
    assert merged.colocated


def test_a_reused_address_is_the_live_pod_not_the_terminated_one():
    # A pod that exited released its IP; the next pod got it while the old Pod object (and its
    # terminating endpoint) lingered. The live pod is the one at that address, in either order.
    gone, live = ("10.0.0.5", "old", {"ready": False, "terminating": True}), (
        "10.0.0.5", "new", READY,
    )  # fmt: skip
    pods = {"old": pod("old", "h1"), "new": pod("new", "h2")}
    for order in ([gone, live], [live, gone]):
        (e,) = slice_endpoints([endpoint_slice("d", "decode", order)], pods, frozenset({DECODE}))
        assert (e.name, e.draining, e.rollout_hash) == ("new", False, "h2")
    # The old pod was decode, the new one prefill: two pods, not one colocated draining pod.
    old_decode = slice_endpoints([endpoint_slice("d", "decode", [gone])], pods, frozenset({DECODE}))
    new_prefill = slice_endpoints(
        [endpoint_slice("p", "prefill", [live])], pods, frozenset({PREFILL})
    )
    for merged in (merge_roles(new_prefill, old_decode), merge_roles(old_decode, new_prefill)):
        (e,) = merged
        assert (e.name, e.roles, e.draining) == ("new", frozenset({PREFILL}), False)
    # Two terminating pods at one address stay one draining endpoint.
    (e,) = slice_endpoints(
        [endpoint_slice("d", "decode", [gone, ("10.0.0.5", "new", {"terminating": True})])],
        pods, frozenset({DECODE}),
    )  # fmt: skip
    assert e.draining


RESOURCES = {
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True),
    "v1/pods": ("Pod", True),
    "v1/namespaces": ("Namespace", False),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


async def test_watch_follows_endpointslices_in_kmock():
    """List + watch against an API server emulator: pods appear, go unready, change hash."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        for resource, (kind, namespaced) in RESOURCES.items():
            emulator.resources[resource] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS
            )
        access = KubeAccess.detect(str(server.url))
        seen: list[list] = []
        disco = KubernetesDiscovery(access, NS, PREFILL_SEL, DECODE_SEL, seen.append)

        async with access.client() as http:

            async def post(path: str, body: dict) -> None:
                r = await http.post(path, json=body)
                assert r.status_code < 300, r.text

            async def put_slice(body: dict) -> None:
                path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
                r = await http.patch(f"{path}/{body['metadata']['name']}", json=body)
                if r.status_code == 404:
                    await post(path, body)
                else:
                    assert r.status_code < 300, r.text

            for name, compat in (("pf-1", "h1"), ("dc-1", "h1"), ("dc-2", "h2"), ("other", "h1")):
                await post(f"/api/v1/namespaces/{NS}/pods", pod(name, compat))
            await put_slice(endpoint_slice("pf", "prefill", [("10.0.0.1", "pf-1", READY)]))
            # A slice of another service must not be picked up.
            foreign = endpoint_slice("foreign", "prefill", [("10.9.9.9", "other", READY)])
            foreign["metadata"]["labels"][L.INSTANCE_LABEL] = "other-service"
            await put_slice(foreign)

            task = asyncio.create_task(disco.run())
            try:

                async def until(pred, what):
                    for _ in range(200):
                        if seen and pred(seen[-1]):
                            return seen[-1]
                        await asyncio.sleep(0.025)
                    pytest.fail(f"discovery never reported {what}: {seen[-1:]}")

                def addrs(eps):
                    return {(e.address, tuple(sorted(e.roles)), e.rollout_hash) for e in eps}

                await until(lambda e: addrs(e) == {("10.0.0.1:50051", ("prefill",), "h1")}, "pf")
                dec = endpoint_slice(
                    "dc", "decode", [("10.0.0.2", "dc-1", READY), ("10.0.0.3", "dc-2", READY)]
                )
                await put_slice(dec)
                await until(lambda e: len(e) == 3, "decode pods")
                assert {e.rollout_hash for e in seen[-1] if e.address == "10.0.0.3:50051"} == {"h2"}
                # dc-1 turns unready: removed.
                dec2 = copy.deepcopy(dec)
                dec2["endpoints"][0]["conditions"] = {"ready": False}
                await put_slice(dec2)
                await until(
                    lambda e: {x.address for x in e} == {"10.0.0.1:50051", "10.0.0.3:50051"},
                    "dc-1 removed",
                )
                # dc-2 is being deleted: still reported, as draining, until its pod is gone.
                dec3 = copy.deepcopy(dec2)
                dec3["endpoints"][1]["conditions"] = {
                    "ready": False, "serving": True, "terminating": True
                }  # fmt: skip
                await put_slice(dec3)
                await until(
                    lambda e: (
                        {(x.address, x.draining) for x in e}
                        == {("10.0.0.1:50051", False), ("10.0.0.3:50051", True)}
                    ),
                    "dc-2 draining",
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def test_selector_matching():
    labels = {"a": "1", "b": "2"}
    assert selector_matches("a=1,b==2", labels)
    assert not selector_matches("a=1,b=3", labels)
    assert selector_matches("a, !c, b!=3", labels)
    assert not selector_matches("c", labels) and not selector_matches("!a", labels)


def test_equal_selectors_mean_colocated():
    d = KubernetesDiscovery(KubeAccess("http://x"), NS, DECODE_SEL, DECODE_SEL, lambda e: None)
    assert list(d._selectors.values()) == [frozenset({PREFILL, DECODE})]
