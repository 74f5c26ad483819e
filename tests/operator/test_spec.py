"""The CRD schema, defaulting and the typed spec: good specs parse, bad ones name their field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from splitserve.operator import crd
from splitserve.operator.cli import render
from splitserve.operator.spec import SpecError, parse

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").rglob("*-*.yaml"))


def test_crd_is_structural_enough_for_the_api_server() -> None:
    doc = crd.load_crd()
    assert doc["metadata"]["name"] == crd.CRD_NAME
    assert doc["spec"]["names"]["shortNames"] == ["ssvc", "splitisvc"]
    (version,) = doc["spec"]["versions"]
    # The scale subresource (kubectl scale, HPA, KEDA) drives the decode pool; HPA finds the
    # pods it averages over by the selector in status.
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.decode.replicas",
            "statusReplicasPath": ".status.decode.replicas",
            "labelSelectorPath": ".status.decode.selector",
        },
    }
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["decode"]["properties"]["selector"] == {
        "type": "string",
        "description": "The label selector of the role's pods (the scale subresource's).",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Model", "Prefill", "Decode", "URL", "Ready", "Age"]
    # Anchors/aliases would be expanded differently by other YAML tools: the file has none.
    events = list(yaml.parse(crd.crd_text()))
    assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events)


def _structural_problems(node: dict, path: str) -> list[str]:
    """The API server's structural-schema rules that matter for this CRD."""
    problems = []
    if node.get("x-kubernetes-int-or-string"):
        branches = node.get("anyOf")
        if "type" in node or branches not in (None, [{"type": "integer"}, {"type": "string"}]):
            problems.append(f"{path}: int-or-string must be anyOf [integer, string] without type")
        return problems
    if "type" not in node:
        problems.append(f"{path}: no type")
    for keyword in ("anyOf", "oneOf", "allOf", "not"):
        if keyword in node:
            problems.append(f"{path}: {keyword} outside int-or-string")
    if "default" in node:
        validator = jsonschema.Draft7Validator(node)
        problems += [
            f"{path}: default: {e.message}" for e in validator.iter_errors(node["default"])
        ]
    for name, sub in node.get("properties", {}).items():
        problems += _structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _structural_problems(node[key], f"{path}[{key}]")
    return problems


def test_schema_is_structural_and_defaults_are_valid() -> None:
    assert _structural_problems(crd.openapi_schema(), "") == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert crd.validate(doc) == []
    parse(doc)


def test_defaults_come_from_the_crd(make_isvc) -> None:
    isvc = parse(make_isvc())
    s = isvc.spec
    assert (s.engine.dtype, s.engine.block_size, s.engine.max_model_len) == ("bfloat16", 16, 4096)
    # unset: the engines' performance mode (or their own default, 128) decides
    assert s.engine.max_num_seqs is None and s.engine.extra_args == ()
    assert s.engine.performance_mode is None
    assert s.engine.quantization is None and s.engine.effective_quantization == "none"
    assert (s.router.pool.replicas, s.router.policy, s.router.service_port) == (1, "prefix", 80)
    assert (s.kv_transfer.transport, s.kv_transfer.failure_policy) == ("nixl", "recompute")
    assert s.kv_transfer.lease_seconds == 30
    assert (s.rollout.max_surge, s.rollout.max_unavailable) == (1, 0)
    assert s.decode.resources["requests"] == {"cpu": "1", "memory": "4Gi"}
    assert s.model.served_name == "smollm2"
    assert (isvc.name, isvc.namespace, isvc.uid, isvc.generation) == ("chat", "ml", "1234-uid", 3)


@pytest.mark.parametrize(
    ("uri", "argument", "claim"),
    [
        ("pvc://weights/llama/8b", "/models/weights/llama/8b", "weights"),
        ("file:///models/x", "/models/x", None),
        # Downloads land in the cache, keyed by revision (the base spec pins abc123).
        ("hf://org/name", "/models/cache/hf/org/name/abc123", None),
        ("s3://bucket/llama/8b/", "/models/cache/s3/bucket/llama/8b", None),
        ("oci://ghcr.io/acme/llama:1.0", "/models/image/models", None),
    ],
)
def test_model_uri_becomes_the_engine_argument(make_isvc, uri, argument, claim) -> None:
    model = parse(make_isvc({"model": {"uri": uri}})).spec.model
    assert (model.engine_argument, model.pvc_claim) == (argument, claim)


BROKEN = [
    ({"model": {"uri": "ftp://bucket/x"}}, "spec.model.uri"),
    ({"model": {"uri": "oci://Registry/Repo"}}, "spec.model.uri"),
    ({"model": {"uri": "s3://b"}}, "spec.model.uri"),
    ({"model": {"revision": "bad rev"}}, "spec.model.revision"),
    ({"engine": {"blockSize": 17}}, "spec.engine.blockSize"),
    ({"engine": {"dtype": "int4"}}, "spec.engine.dtype"),
    ({"engine": {"maxModelLen": 8}}, "spec.engine.maxModelLen"),
    ({"engine": {"maxNumSeqs": 0}}, "spec.engine.maxNumSeqs"),
    ({"engine": {"performanceMode": "fast"}}, "spec.engine.performanceMode"),
    ({"engine": {"extraArgs": ["--performance-mode=throughput"]}}, "spec.engine.extraArgs[0]"),
    ({"engine": {"extraArgs": ["--enforce-eager", "--port=9"]}}, "spec.engine.extraArgs[1]"),
    ({"engine": {"typo": 1}}, "spec.engine.typo"),
    ({"prefill": {"replicas": -1}}, "spec.prefill.replicas"),
    ({"decode": {"replicas": -1}}, "spec.decode.replicas"),
    ({"decode": {"resources": {"limits": {"memory": "lots"}}}},
     "spec.decode.resources.limits.memory"),
    ({"router": {"policy": "random"}}, "spec.router.policy"),
    ({"router": {"service": {"port": 70000}}}, "spec.router.service.port"),
    ({"router": {"apiKeySecret": {"key": "k"}}}, "spec.router.apiKeySecret.name"),
    ({"kvTransfer": {"transport": "tcp"}}, "spec.kvTransfer.transport"),
    ({"kvTransfer": {"leaseSeconds": 0}}, "spec.kvTransfer.leaseSeconds"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "spec.rollout"),
    ({"rollout": {"maxSurge": "half"}}, "spec.rollout.maxSurge"),
    ({"rollout": {"maxUnavailable": "150%"}}, "spec.rollout.maxUnavailable"),
    ({"drainSeconds": -1}, "spec.drainSeconds"),
    ({"decode": {"autoscaling": {"minReplicas": 1}}}, "spec.decode.autoscaling.maxReplicas"),
    ({"decode": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2,
                                 "targets": {"concurrency": 4}}}},
     "spec.decode.autoscaling.minReplicas"),
    ({"decode": {"autoscaling": {"maxReplicas": 2}}}, "spec.decode.autoscaling.targets"),
    ({"decode": {"autoscaling": {"maxReplicas": 2, "targets": {"kvCacheUsage": 1.5}}}},
     "spec.decode.autoscaling.targets.kvCacheUsage"),
    ({"decode": {"autoscaling": {"maxReplicas": 2, "targets": {"itlSeconds": 0.1},
                                 "scaleDown": {"stabilizationSeconds": -5}}}},
     "spec.decode.autoscaling.scaleDown.stabilizationSeconds"),
    ({"prefill": {"replicas": 0, "autoscaling": {"maxReplicas": 2,
                                                 "targets": {"queueDepth": 2}}}},
     "spec.prefill.autoscaling"),
    ({"prefill": {"autoscaling": {"maxReplicas": 2, "external": True}}},
     "spec.prefill.autoscaling.external"),
    ({"autoscaling": {"policy": "Proportional"}}, "spec.autoscaling.policy"),
    ({"autoscaling": {"policy": "FixedRatio"},
      "prefill": {"autoscaling": {"maxReplicas": 2}}}, "spec.autoscaling.prefillPerDecode"),
    ({"autoscaling": {"policy": "FixedRatio", "prefillPerDecode": 0.5}},
     "spec.prefill.autoscaling"),
    ({"autoscaling": {"minPrefillPerDecode": 2, "maxPrefillPerDecode": 1}},
     "spec.autoscaling.minPrefillPerDecode"),
    # model sources: download settings only where something downloads
    ({"model": {"credentials": {"secretName": "t"}}}, "spec.model.credentials"),
    ({"model": {"uri": "hf://o/n", "endpoint": "ftp://mirror"}}, "spec.model.endpoint"),
    ({"model": {"uri": "hf://o/n", "cache": {"claimName": "c", "hostPath": "/d"}}},
     "spec.model.cache"),
    ({"model": {"uri": "hf://o/n", "cache": {"hostPath": "relative"}}},
     "spec.model.cache.hostPath"),
    # pass-through fields: shapes, and nothing of the operator's replaced
    ({"decode": {"env": [{"value": "x"}]}}, "spec.decode.env[0].name"),
    ({"decode": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "spec.decode.volumes[0].name"),
    ({"decode": {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}},
     "spec.decode.volumes[1].name"),
    ({"decode": {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}},
     "spec.decode.volumeMounts[0].name"),
    ({"decode": {"volumes": [{"name": "a", "emptyDir": {}}],
                 "volumeMounts": [{"name": "a", "mountPath": "/dev/shm"}]}},
     "spec.decode.volumeMounts[0].mountPath"),
    ({"prefill": {"volumes": [{"name": "a", "emptyDir": {}}],
                  "volumeMounts": [{"name": "a", "mountPath": "/models/weights"}]}},
     "spec.prefill.volumeMounts[0].mountPath"),
    ({"decode": {"volumes": [{"name": "adapters-pvc-0", "emptyDir": {}}]}},
     "spec.decode.volumes[0].name"),
    ({"decode": {"volumes": [{"name": "a", "emptyDir": {}}],
                 "volumeMounts": [{"name": "a", "mountPath": "/adapters/x"}]}},
     "spec.decode.volumeMounts[0].mountPath"),
    ({"decode": {"podLabels": {"serving.splitserve.io/role": "x"}}},
     "spec.decode.podLabels.serving.splitserve.io/role"),
    ({"router": {"podAnnotations": {"serving.splitserve.io/config-checksum": "x"}}},
     "spec.router.podAnnotations.serving.splitserve.io/config-checksum"),
    ({"decode": {"priorityClassName": "High"}}, "spec.decode.priorityClassName"),
    ({"decode": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]}},
     "spec.decode.topologySpreadConstraints[0].whenUnsatisfiable"),
    ({"decode": {"shmSize": "big"}}, "spec.decode.shmSize"),
    ({"router": {"shmSize": "2Gi"}}, "spec.router.shmSize"),
    ({"prefill": {"serviceAccount": {"annotations": {"a": "1"}}},
      "decode": {"serviceAccount": {"annotations": {"a": "2"}}}},
     "spec.prefill.serviceAccount.annotations.a"),
    ({"observability": {"metrics": {"allowFrom": [{"namespaces": ["x"]}]}}},
     "spec.observability.metrics.allowFrom[0].namespaces"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field"), BROKEN, ids=[f for _, f in BROKEN])
def test_broken_specs_are_refused_naming_the_field(make_isvc, change, field) -> None:
    with pytest.raises(SpecError) as info:
        parse(make_isvc(change))
    assert field in [e.path for e in info.value.errors]


def test_missing_required_fields_are_named(make_isvc) -> None:
    obj = make_isvc()
    del obj["spec"]["image"]
    del obj["spec"]["model"]["uri"]
    with pytest.raises(SpecError) as info:
        parse(obj)
    assert {"spec.image", "spec.model.uri"} <= {e.path for e in info.value.errors}


@pytest.mark.parametrize("name", ["Chat", "9chat", "a" * 41])
def test_bad_names_are_refused(make_isvc, name) -> None:
    with pytest.raises(SpecError) as info:
        parse(make_isvc(metadata={"name": name}))
    assert [e.path for e in info.value.errors] == ["metadata.name"]


def test_wrong_kind_is_refused(make_isvc) -> None:
    errors = crd.validate(make_isvc(kind="Deployment", apiVersion="apps/v1"))
    assert {e.path for e in errors} == {"kind", "apiVersion"}


def test_render_exits_nonzero_naming_the_field(tmp_path, make_isvc, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(make_isvc({"engine": {"blockSize": 12}})))
    assert render(str(path)) == 1
    captured = capsys.readouterr()
    assert "spec.engine.blockSize" in captured.err and captured.out == ""


def test_render_command_line_prints_valid_objects(tmp_path, make_isvc, validate_k8s) -> None:
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(make_isvc()))
    splitserve = Path(sys.executable).with_name("splitserve")
    done = subprocess.run(
        [str(splitserve), "operator", "render", "-f", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    assert len(objects) == 15
    assert validate_k8s(objects) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(make_isvc({"kvTransfer": {"transport": "smoke"}})))
    done = subprocess.run(
        [str(splitserve), "operator", "render", "-f", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1 and "spec.kvTransfer.transport" in done.stderr


def test_cli_arguments() -> None:
    import argparse

    from splitserve.operator import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["run", "--namespace", "a", "--namespace", "b", "--interval", "5"])
    assert (args.action, args.namespace, args.interval) == ("run", ["a", "b"], 5.0)
    args = parser.parse_args(["render", "-f", "x.yaml", "-n", "team"])
    assert (args.action, args.filename, args.namespace) == ("render", "x.yaml", "team")
    assert parser.parse_args(["crd"]).action == "crd"


def test_crd_subcommand_prints_the_crd(capsys) -> None:
    import argparse

    from splitserve.operator import cli

    assert cli.run(argparse.Namespace(action="crd")) == 0
    assert capsys.readouterr().out == crd.crd_text()
