"""The reconcile pass and delete handler as plain functions, against an in-memory API.

The fake stores what is applied (apply replaces the fields we set, keeps status, like SSA with
force for fields we own), counts writes, and can fail on demand; `controller()` plays the
Deployment controller so statuses move.
"""

from __future__ import annotations

import copy
from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.kube import ApiError, KindInfo
from splitserve.operator.reconcile import delete_children, reconcile

T0 = "2026-01-01T00:00:00Z"


class FakeApi:
    def __init__(self) -> None:
        self.store: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes = 0
        self.fail_with: ApiError | None = None

    def _key(self, kind: str, namespace: str, name: str) -> tuple[str, str, str]:
        return (kind, namespace, name)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        self.writes += 1
        meta = obj["metadata"]
        key = self._key(obj["kind"], meta["namespace"], meta["name"])
        old = self.store.get(key, {})
        new = copy.deepcopy(obj)
        if "status" in old:
            new["status"] = old["status"]
        generation = old.get("metadata", {}).get("generation", 0)
        changed = old.get("spec") != new.get("spec")
        new["metadata"]["generation"] = generation + 1 if changed else generation
        self.store[key] = new
        return copy.deepcopy(new)

    async def list(
        self, info: KindInfo, namespace: str, selector: str = ""
    ) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(o)
            for (kind, ns, _), o in self.store.items()
            if kind == info.kind and ns == namespace
        ]

    async def delete(self, info: KindInfo, namespace: str, name: str) -> bool:
        return self.store.pop(self._key(info.kind, namespace, name), None) is not None

    def deployments(self) -> dict[str, dict[str, Any]]:
        return {k[2]: v for k, v in self.store.items() if k[0] == "Deployment"}

    def by_role(self, role: str) -> list[dict[str, Any]]:
        """The Deployments of a role (engine roles: one per generation present)."""
        return [
            d for d in self.deployments().values() if d["metadata"]["labels"][L.ROLE_LABEL] == role
        ]

    def one(self, role: str) -> dict[str, Any]:
        (dep,) = self.by_role(role)
        return dep

    def controller(self) -> None:
        """Roll every Deployment to its spec (what the real controller eventually does)."""
        for dep in self.deployments().values():
            n = dep["spec"]["replicas"]
            dep["status"] = {
                "replicas": n,
                "readyReplicas": n,
                "updatedReplicas": n,
                "observedGeneration": dep["metadata"]["generation"],
            }


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


async def converge(api: FakeApi, body: dict[str, Any]) -> dict[str, Any]:
    """Reconcile, let the controller roll, reconcile again; returns the CR with its status."""
    result = await reconcile(api, body, T0)
    body = body | {"status": result.status}
    api.controller()
    result = await reconcile(api, body, T0)
    return body | {"status": result.status}


async def test_create_applies_everything_then_is_idempotent(make_isvc) -> None:
    api = FakeApi()
    body = make_isvc()
    first = await reconcile(api, body, T0)
    assert len(first.created) == 15 and not first.updated and not first.pruned
    assert [e.reason for e in first.events] == ["Applied"]
    assert conditions(first.status) == {
        "Ready": "False",
        "Progressing": "True",
        "Degraded": "False",
    }
    api.controller()
    writes = api.writes
    second = await reconcile(api, body | {"status": first.status}, T0)
    assert api.writes == writes  # nothing differs: no write at all
    assert not second.created and not second.updated
    assert conditions(second.status)["Ready"] == "True"
    assert [e.reason for e in second.events] == ["RolloutComplete"]


async def test_model_change_brings_up_a_new_generation_beside_the_old(make_isvc) -> None:
    """A new rollout hash is new prefill and decode Deployments; the old generation keeps both
    its roles (pairs never cross generations) until the new one is rolled out, then goes."""
    api = FakeApi()
    body = await converge(api, make_isvc())
    old_hash = body["status"]["rolloutHash"]
    old = {d["metadata"]["name"] for r in L.ENGINE_ROLES for d in api.by_role(r)}
    router_template = copy.deepcopy(api.one("router")["spec"]["template"])
    changed = make_isvc({"model": {"revision": "v2"}, "rollout": {"maxSurge": 2}}) | {
        "status": body["status"]
    }
    result = await reconcile(api, changed, T0)
    new_hash = result.status["desiredRolloutHash"]
    assert new_hash != old_hash
    assert set(result.created) == {f"Deployment/chat-{r}-{new_hash}" for r in L.ENGINE_ROLES}
    # The router's Deployment takes the new rollout limits, but its pods do not roll.
    assert set(result.updated) == {"ConfigMap/chat-engine", "Deployment/chat-router"}
    assert api.one("router")["spec"]["template"] == router_template
    assert set(result.retained) == {f"Deployment/{n}" for n in old} and not result.pruned
    for role in L.ENGINE_ROLES:
        hashes = {d["metadata"]["labels"][L.ROLLOUT_HASH_LABEL] for d in api.by_role(role)}
        assert hashes == {old_hash, new_hash}
        new = api.deployments()[f"chat-{role}-{new_hash}"]
        assert new["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 2, "maxUnavailable": 0}
    # The new pods are not up: status says so, keeps the old hash as served.
    assert conditions(result.status)["Progressing"] == "True"
    assert "previous generation" in next(
        c["message"] for c in result.status["conditions"] if c["type"] == "Progressing"
    )
    assert result.status["rolloutHash"] == old_hash
    assert "RolloutStarted" in [e.reason for e in result.events]
    again = await reconcile(api, changed | {"status": result.status}, T0)
    assert set(again.retained) == set(result.retained)  # still not rolled out
    api.controller()
    done = await reconcile(api, changed | {"status": again.status}, T0)
    assert set(done.pruned) == {f"Deployment/{n}" for n in old}
    assert done.status["rolloutHash"] == new_hash and done.status["revision"] == "v2"
    assert conditions(done.status)["Ready"] == "True"
    assert {d["metadata"]["name"] for r in L.ENGINE_ROLES for d in api.by_role(r)} == {
        f"chat-{r}-{new_hash}" for r in L.ENGINE_ROLES
    }


async def test_engine_setting_change_rolls_inside_the_generation(make_isvc) -> None:
    api = FakeApi()
    body = await converge(api, make_isvc())
    names = set(api.deployments())
    result = await reconcile(
        api, make_isvc({"engine": {"maxNumSeqs": 7}}) | {"status": body["status"]}, T0
    )
    assert set(api.deployments()) == names and not result.created and not result.retained
    assert {f"Deployment/{api.one(r)['metadata']['name']}" for r in L.ENGINE_ROLES} <= set(
        result.updated
    )


async def test_drift_is_undone(make_isvc) -> None:
    api = FakeApi()
    body = await converge(api, make_isvc())
    del api.store[("Service", "ml", "chat-decode")]
    api.one("decode")["spec"]["replicas"] = 9
    result = await reconcile(api, body, T0)
    assert result.created == ("Service/chat-decode",)
    assert result.updated == (f"Deployment/{api.one('decode')['metadata']['name']}",)
    assert api.one("decode")["spec"]["replicas"] == 2


async def test_switching_to_colocated_prunes_the_prefill_pool(make_isvc) -> None:
    api = FakeApi()
    await converge(api, make_isvc())
    prefill = api.one("prefill")["metadata"]["name"]
    body = make_isvc({"prefill": {"replicas": 0}})
    result = await reconcile(api, body, T0)
    stale = {f"Deployment/{prefill}", "Service/chat-prefill", "PodDisruptionBudget/chat-prefill"}
    # The prefill pool serves until the colocated decode pods are rolled out.
    assert set(result.retained) == stale and not result.pruned
    api.controller()
    result = await reconcile(api, body | {"status": result.status}, T0)
    assert set(result.pruned) == stale
    assert not api.by_role("prefill")


async def test_foreign_objects_are_never_pruned(make_isvc) -> None:
    api = FakeApi()
    foreign = {"kind": "ConfigMap", "metadata": {"name": "mine", "namespace": "ml", "labels": {}}}
    api.store[("ConfigMap", "ml", "mine")] = foreign
    other = {
        "kind": "ConfigMap",
        "metadata": {
            "name": "other-engine",
            "namespace": "ml",
            "labels": {L.INSTANCE_LABEL: "other"},
        },
    }
    api.store[("ConfigMap", "ml", "other-engine")] = other
    # Same labels as ours but no owner reference: made by someone else.
    lookalike = {
        "kind": "Service",
        "metadata": {
            "name": "chat-extra",
            "namespace": "ml",
            "labels": {L.INSTANCE_LABEL: "chat", L.MANAGED_BY_LABEL: L.MANAGED_BY},
        },
    }
    api.store[("Service", "ml", "chat-extra")] = lookalike
    result = await reconcile(api, make_isvc(), T0)
    assert not result.pruned
    for key in (("ConfigMap", "ml", "mine"), ("ConfigMap", "ml", "other-engine")):
        assert key in api.store
    assert ("Service", "ml", "chat-extra") in api.store


async def test_invalid_spec_applies_nothing_and_warns_once(make_isvc) -> None:
    api = FakeApi()
    body = make_isvc({"engine": {"extraArgs": ["--model=x"]}})
    result = await reconcile(api, body, T0)
    assert api.writes == 0 and result.retry == "permanent"
    assert conditions(result.status) == {
        "Ready": "False",
        "Progressing": "False",
        "Degraded": "True",
    }
    assert "spec.engine.extraArgs[0]" in result.error
    assert [e.type for e in result.events] == ["Warning"]
    again = await reconcile(api, body | {"status": result.status}, T0)
    assert again.events == ()  # the same problem is not announced on every timer tick


async def test_invalid_update_leaves_the_running_version_alone(make_isvc) -> None:
    api = FakeApi()
    body = await converge(api, make_isvc())
    before = copy.deepcopy(api.store)
    bad = make_isvc({"model": {"revision": "v2"}, "engine": {"blockSize": 3}})
    result = await reconcile(api, bad | {"status": body["status"]}, T0)
    assert api.store == before  # never half-applied
    assert result.status["rolloutHash"] == body["status"]["rolloutHash"]


async def test_api_errors_become_retries(make_isvc) -> None:
    api = FakeApi()
    api.fail_with = ApiError(503, "ServiceUnavailable", "etcd is sad")
    result = await reconcile(api, make_isvc(), T0)
    assert result.retry == "temporary"
    assert conditions(result.status)["Degraded"] == "True"
    api.fail_with = ApiError(422, "Invalid", "bad object")
    assert (await reconcile(api, make_isvc(), T0)).retry == "permanent"


async def test_delete_removes_only_our_children(make_isvc) -> None:
    api = FakeApi()
    await converge(api, make_isvc())
    api.store[("ConfigMap", "ml", "mine")] = {"kind": "ConfigMap", "metadata": {"name": "mine"}}
    deleted = await delete_children(api, "ml", "chat", "1234-uid")
    assert len(deleted) == 15
    assert list(api.store) == [("ConfigMap", "ml", "mine")]


async def test_removed_fields_are_reapplied(make_isvc) -> None:
    api = FakeApi()
    await converge(api, make_isvc({"decode": {"nodeSelector": {"gpu": "a100"}}}))
    result = await reconcile(api, make_isvc(), T0)
    assert f"Deployment/{api.one('decode')['metadata']['name']}" in result.updated
    pod = api.one("decode")["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod


async def test_apply_failure_still_reports_the_running_pools(make_isvc) -> None:
    api = FakeApi()
    body = await converge(api, make_isvc())
    api.fail_with = ApiError(403, "Forbidden", "no rights")
    changed = make_isvc({"model": {"revision": "v9"}}) | {"status": body["status"]}
    result = await reconcile(api, changed, T0)
    assert result.retry == "permanent" and "403" in result.error
    assert result.status["decode"]["summary"] == "2/2"
    assert conditions(result.status)["Ready"] == "False"
