"""spec.adapters: parsed and checked, built into a watched adapter list that never restarts pods,
and reported per role in status (the builders and the reconcile pass as plain functions)."""

from __future__ import annotations

import json

import pytest
from test_reconcile import T0, FakeApi, conditions, converge

from splitserve.operator import labels as L
from splitserve.operator.adapters import ADAPTERS_FILE, adapters_status
from splitserve.operator.builders import build_desired
from splitserve.operator.builders.config import config_checksum
from splitserve.operator.reconcile import reconcile
from splitserve.operator.spec import SpecError, parse

ADAPTERS = [
    {"name": "sql", "uri": "pvc://adapters/sql-lora"},
    {"name": "chat-fr", "uri": "hf://acme/chat-fr-lora"},
    {"name": "baked", "uri": "file:///opt/adapters/baked"},
]


def objects_by_ref(objs):
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def engine_container(objs, role):
    (dep,) = [o for o in objs if o["kind"] == "Deployment"
              and o["metadata"]["labels"][L.ROLE_LABEL] == role]  # fmt: skip
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def test_adapters_parse_with_defaults_and_engine_paths(make_isvc):
    isvc = parse(make_isvc({"adapters": ADAPTERS}))
    assert [(a.name, a.engine_path) for a in isvc.spec.adapters] == [
        ("sql", "/adapters/adapters/sql-lora"),
        ("chat-fr", "hf://acme/chat-fr-lora"),
        ("baked", "/opt/adapters/baked"),
    ]
    assert isvc.spec.lora_enabled  # listing adapters enables LoRA
    lora = isvc.spec.engine.lora
    assert (lora.enabled, lora.max_loras, lora.max_lora_rank) == (False, 4, 16)
    assert not parse(make_isvc()).spec.lora_enabled


@pytest.mark.parametrize(
    ("adapters", "field"),
    [
        ([{"name": "a", "uri": "s3://bucket/a"}], "spec.adapters[0].uri"),
        ([{"name": "-bad", "uri": "file:///a"}], "spec.adapters[0].name"),
        ([{"name": "a", "uri": "file:///a"}, {"name": "a", "uri": "file:///b"}],
         "spec.adapters[1].name"),
        ([{"name": "smollm2", "uri": "file:///a"}], "spec.adapters[0].name"),  # the served name
        ([{"name": "a"}], "spec.adapters[0]"),
    ],
)  # fmt: skip
def test_bad_adapters_are_spec_errors_naming_the_field(make_isvc, adapters, field):
    with pytest.raises(SpecError) as err:
        parse(make_isvc({"adapters": adapters}))
    assert any(e.path.startswith(field) for e in err.value.errors), err.value.errors


def test_engine_flags_are_the_operators_own(make_isvc):
    with pytest.raises(SpecError, match="--max-loras is set by the operator"):
        parse(make_isvc({"engine": {"extraArgs": ["--max-loras=8"]}}))


def test_builders_mount_a_watched_list_and_pass_the_limits(make_isvc, validate_k8s):
    isvc = parse(make_isvc({"adapters": ADAPTERS, "engine": {"lora": {"maxLoras": 8}}}))
    objs = build_desired(isvc)
    assert validate_k8s(objs) == []
    cm = objects_by_ref(objs)["ConfigMap/chat-adapters"]
    assert json.loads(cm["data"]["adapters.json"]) == [
        {"name": "sql", "path": "/adapters/adapters/sql-lora"},
        {"name": "chat-fr", "path": "hf://acme/chat-fr-lora"},
        {"name": "baked", "path": "/opt/adapters/baked"},
    ]
    for role in L.ENGINE_ROLES:
        dep, container = engine_container(objs, role)
        args = container["args"]
        assert args[args.index("--lora-modules-file") + 1] == ADAPTERS_FILE
        assert args[args.index("--max-loras") + 1] == "8" and "--enable-lora" in args
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/splitserve/adapters"] == "adapters"
        assert mounts["/adapters/adapters"].startswith("adapters-pvc")
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["adapters"]["configMap"]["name"] == "chat-adapters"
    policy = objects_by_ref(objs)["NetworkPolicy/chat-engines"]
    admitted = [f["podSelector"]["matchLabels"] for r in policy["spec"]["ingress"]
                for f in r.get("from", [])]  # fmt: skip
    assert L.OPERATOR_POD_LABELS in admitted


def test_adding_or_removing_adapters_leaves_the_pod_templates_alone(make_isvc):
    """The promise of spec.adapters: no restart. With LoRA on, only the watched list changes
    (for adapters on claims already mounted, and on hf:// or file:// URIs)."""
    lora = {"engine": {"lora": {"enabled": True}}}
    before = parse(make_isvc(lora))
    after = parse(make_isvc(lora | {"adapters": ADAPTERS[1:]}))
    fewer = parse(make_isvc(lora | {"adapters": ADAPTERS[2:]}))
    templates = [
        {role: engine_container(build_desired(i), role)[0]["spec"]["template"]
         for role in L.ENGINE_ROLES}
        for i in (before, after, fewer)
    ]  # fmt: skip
    assert templates[0] == templates[1] == templates[2]
    assert config_checksum(before) == config_checksum(after) == config_checksum(fewer)
    assert before.spec.rollout_hash == after.spec.rollout_hash
    lists = [objects_by_ref(build_desired(i))["ConfigMap/chat-adapters"] for i in (before, after)]
    assert lists[0]["data"] != lists[1]["data"]


async def test_reconcile_updates_only_the_list_when_adapters_change(make_isvc):
    api = FakeApi()
    body = await converge(api, make_isvc({"engine": {"lora": {"enabled": True}}}))
    changed = body | {"spec": body["spec"] | {"adapters": ADAPTERS[1:]}}
    result = await reconcile(api, changed, T0)
    assert result.updated == ("ConfigMap/chat-adapters",)
    assert not result.created and not result.pruned


class EnginesSay:
    """What each engine pod answers to GetInfo (address -> loaded adapter names)."""

    def __init__(self, loaded: dict[str, list[str] | None]) -> None:
        self.answers = loaded
        self.asked: list[str] = []

    async def loaded(self, address: str) -> list[str] | None:
        self.asked.append(address)
        return self.answers.get(address)


def add_pod(api: FakeApi, name: str, role: str, ip: str, ready: bool = True) -> None:
    api.store[("Pod", "ml", name)] = {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "labels": {L.ROLE_LABEL: role}},
        "spec": {"containers": [{"name": "engine",
                                 "ports": [{"name": "grpc", "containerPort": 7000}]}]},
        "status": {"podIP": ip, "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


async def test_status_lists_what_each_role_has_loaded(make_isvc):
    api = FakeApi()
    body = make_isvc({"adapters": ADAPTERS[1:]})
    body = await converge(api, body)
    add_pod(api, "p0", L.PREFILL, "10.0.0.1")
    add_pod(api, "d0", L.DECODE, "10.0.0.2")
    add_pod(api, "d1", L.DECODE, "10.0.0.3")
    add_pod(api, "d2", L.DECODE, "10.0.0.4", ready=False)  # not asked: not ready
    probe = EnginesSay({
        "10.0.0.1:7000": ["chat-fr", "baked"],
        "10.0.0.2:7000": ["chat-fr", "baked"],
        "10.0.0.3:7000": ["chat-fr"],
    })  # fmt: skip
    result = await reconcile(api, body, T0, probe)
    assert sorted(probe.asked) == ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
    status = result.status
    assert status["loadedAdapters"] == {"prefill": ["baked", "chat-fr"], "decode": ["chat-fr"]}
    assert status["adapters"] == [
        {"name": "chat-fr", "prefill": "1/1", "decode": "2/2", "loaded": True},
        {"name": "baked", "prefill": "1/1", "decode": "1/2", "loaded": False},
    ]
    assert conditions(status)["AdaptersLoaded"] == "False"
    cond = next(c for c in status["conditions"] if c["type"] == "AdaptersLoaded")
    assert cond["reason"] == "Loading" and "baked (decode 1/2)" in cond["message"]
    assert conditions(status)["Ready"] == "True"  # adapters loading never takes a pod down

    probe.answers["10.0.0.3:7000"] = ["chat-fr", "baked"]
    result = await reconcile(api, body | {"status": status}, T0, probe)
    assert conditions(result.status)["AdaptersLoaded"] == "True"
    assert [e.reason for e in result.events] == ["AdaptersLoaded"]
    again = await reconcile(api, body | {"status": result.status}, T0, probe)
    assert "AdaptersLoaded" not in [e.reason for e in again.events]  # said once


def test_a_pod_that_cannot_be_asked_counts_as_not_loaded(make_isvc):
    isvc = parse(make_isvc({"adapters": ADAPTERS[2:]}))
    fields, (ok, reason, _) = adapters_status(isvc, {"prefill": [["baked"]], "decode": [None]})
    assert fields["adapters"] == [{"name": "baked", "prefill": "1/1", "decode": "0/1",
                                   "loaded": False}]  # fmt: skip
    assert fields["loadedAdapters"] == {"prefill": ["baked"], "decode": []}
    assert (ok, reason) == (False, "Loading")
