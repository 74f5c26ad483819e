"""Observability objects of the inferenceservice chart, the Grafana dashboard and the Argo CD
health check (docs/observability.md).

The monitors are checked against what the operator really creates (its builders, not
hard-coded labels) and against the Prometheus Operator's own CRD schemas (vendored in data/);
the dashboard against the metric names the servers really register; the Lua against statuses
made by the operator's own `compute_status`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helm_support import helm_run

from splitserve.operator import crd
from splitserve.operator import labels as L
from splitserve.operator.builders import build_desired
from splitserve.operator.builders.router import LIVENESS_PATH, router_service_name
from splitserve.operator.spec import parse
from splitserve.operator.status import compute_status, invalid_spec_status, pod_problems

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "inferenceservice"
DASHBOARD = CHART / "dashboards" / "splitserve.json"
HEALTH_LUA = REPO / "manifests" / "argocd" / "health.lua"
DATA = Path(__file__).resolve().parent / "data"

MONITORS_ON = [
    "--set", "monitoring.serviceMonitor.enabled=true",
    "--set", "monitoring.podMonitor.enabled=true",
]  # fmt: skip
CASES = {
    "disaggregated": [],
    "colocated": ["--set", "name=llama", "--set", "prefill.replicas=0"],
}


def render(helm: str, *values: str) -> list[dict[str, Any]]:
    done = helm_run(helm, "template", "rel", str(CHART), "-n", "ns", *values)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector, as the API server (and Prometheus' discovery) applies it."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        matched = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matched:
            return False
    return True


def desired_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the operator builds from the InferenceService the chart rendered beside them."""
    return build_desired(parse(one(objects, crd.KIND)))


def other_service(make_isvc) -> list[dict[str, Any]]:
    """The children of another InferenceService in the same namespace (must not be scraped)."""
    return build_desired(parse(make_isvc(metadata={"name": "other", "namespace": "ns"})))


# --- rendering -----------------------------------------------------------------------------


def test_nothing_but_the_inferenceservice_by_default(helm) -> None:
    assert [o["kind"] for o in render(helm)] == [crd.KIND]


@pytest.mark.parametrize(
    ("flag", "kind"),
    [
        ("serviceMonitor", "ServiceMonitor"),
        ("podMonitor", "PodMonitor"),
        ("networkPolicy", "NetworkPolicy"),
        ("dashboard", "ConfigMap"),
    ],
)
def test_each_object_renders_only_when_enabled(helm, flag, kind) -> None:
    objects = render(helm, "--set", f"monitoring.{flag}.enabled=true")
    assert sorted(o["kind"] for o in objects) == sorted([crd.KIND, kind])


def test_lint_passes_with_everything_enabled(helm) -> None:
    flags = [f"monitoring.{f}.enabled=true" for f in ("podMonitor", "networkPolicy", "dashboard")]
    done = helm_run(helm, "lint", "--strict", str(CHART), *MONITORS_ON, "--set", ",".join(flags))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (["--set", "monitoring.serviceMonitor.interval=30 seconds"], "interval"),
        (["--set", "monitoring.podMonitor.scrapeTimeout=ten"], "scrapeTimeout"),
        (["--set-json", "monitoring.networkPolicy.from=[]"], "from"),
        (["--set", "monitoring.serviceMonitor.enabeld=true"], "enabeld"),
    ],
)
def test_schema_rejects_bad_monitoring_values(helm, values, field) -> None:
    done = helm_run(helm, "template", "rel", str(CHART), *values)
    assert done.returncode != 0 and field in done.stderr


def test_values_reach_the_monitors(helm) -> None:
    objects = render(
        helm, *MONITORS_ON,
        "--set", "monitoring.serviceMonitor.labels.release=kps",
        "--set", "monitoring.serviceMonitor.interval=1m",
        "--set", "monitoring.serviceMonitor.scrapeTimeout=",
    )  # fmt: skip
    sm, pm = one(objects, "ServiceMonitor"), one(objects, "PodMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert "release" not in pm["metadata"]["labels"]
    assert {e["interval"] for e in sm["spec"]["endpoints"]} == {"1m"}
    assert all("scrapeTimeout" not in e for e in sm["spec"]["endpoints"])  # Prometheus' own
    assert {e["scrapeTimeout"] for e in pm["spec"]["podMetricsEndpoints"]} == {"10s"}


# --- the monitors select what the operator creates ----------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_service_monitor_scrapes_every_service_of_this_inferenceservice(
    helm, make_isvc, case
) -> None:
    objects = render(helm, *MONITORS_ON, *CASES[case])
    spec = one(objects, "ServiceMonitor")["spec"]
    services = [o for o in desired_of(objects) if o["kind"] == "Service"]
    assert all(selects(spec["selector"], s["metadata"]["labels"]) for s in services)
    others = [o for o in other_service(make_isvc) if o["kind"] == "Service"]
    assert not any(selects(spec["selector"], s["metadata"]["labels"]) for s in others)

    # An endpoint finds targets only on Services with a port of its name: each Service must
    # be scraped by exactly one endpoint, the engines' on `metrics`, the router's on `http`.
    by_port = {e["port"]: e for e in spec["endpoints"]}
    for service in services:
        names = {p["name"] for p in service["spec"]["ports"]}
        assert len(names & by_port.keys()) == 1, service["metadata"]["name"]
    router_name = router_service_name(parse(one(objects, crd.KIND)))
    router = next(s for s in services if s["metadata"]["name"] == router_name)
    assert {p["name"] for p in router["spec"]["ports"]} & by_port.keys() == {"http"}
    assert by_port["http"]["path"] == LIVENESS_PATH == "/metrics"  # the router's /metrics
    assert by_port["metrics"]["path"] == "/metrics"


@pytest.mark.parametrize("case", CASES)
def test_pod_monitor_scrapes_every_pod_of_this_inferenceservice(helm, make_isvc, case) -> None:
    objects = render(helm, *MONITORS_ON, *CASES[case])
    spec = one(objects, "PodMonitor")["spec"]
    by_port = {e["port"]: e for e in spec["podMetricsEndpoints"]}
    deployments = [o for o in desired_of(objects) if o["kind"] == "Deployment"]
    for deployment in deployments:
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert selects(spec["selector"], labels), deployment["metadata"]["name"]
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        expected = {"http"} if labels[L.ROLE_LABEL] == L.ROUTER else {"metrics"}
        assert ports & by_port.keys() == expected, deployment["metadata"]["name"]
    others = [o for o in other_service(make_isvc) if o["kind"] == "Deployment"]
    assert not any(
        selects(spec["selector"], d["spec"]["template"]["metadata"]["labels"]) for d in others
    )


def _meta_label(key: str) -> str:
    """Prometheus' service-discovery name of a pod label."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_monitors_label_series_with_the_operators_pod_labels(helm) -> None:
    objects = render(helm, *MONITORS_ON)
    endpoints = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    endpoints += one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    wanted = {_meta_label(L.INSTANCE_LABEL): "inferenceservice"}
    wanted[_meta_label(L.ROLLOUT_HASH_LABEL)] = "rollout_hash"
    engine = next(
        d for d in desired_of(objects)
        if d["kind"] == "Deployment" and d["spec"]["template"]["metadata"]["labels"].get(
            L.ROLE_LABEL) == L.DECODE
    )  # fmt: skip
    engine_labels = engine["spec"]["template"]["metadata"]["labels"]
    assert {_meta_label(k) for k in engine_labels} >= wanted.keys()
    for endpoint in endpoints:
        got = {r["sourceLabels"][0]: r["targetLabel"] for r in endpoint["relabelings"]}
        assert got == wanted
        # The metrics carry their own `role` (and the router its `pod` for routed samples).
        assert "role" not in got.values()
        assert endpoint["honorLabels"] is (endpoint["port"] == "http")


# --- the Prometheus Operator's CRD schemas -------------------------------------------------


def _crd_schema(plural: str) -> dict[str, Any]:
    doc = yaml.safe_load((DATA / f"monitoring.coreos.com_{plural}.yaml").read_text())
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return {"group": doc["spec"]["group"], "kind": doc["spec"]["names"]["kind"]} | {
        "schema": version["schema"]["openAPIV3Schema"]
    }


def _unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would prune silently (what `kubectl apply --validate=strict`
    refuses): structural schemas never say additionalProperties: false."""
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return out
        for key, sub in value.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += _unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            out += _unknown_fields(item, schema["items"], f"{path}[{index}]")
    return out


@pytest.mark.parametrize(("kind", "plural"), [("ServiceMonitor", "servicemonitors"),
                                              ("PodMonitor", "podmonitors")])  # fmt: skip
@pytest.mark.parametrize("case", CASES)
def test_monitors_are_valid_for_the_prometheus_operator(helm, kind, plural, case) -> None:
    definition = _crd_schema(plural)
    monitor = one(render(helm, *MONITORS_ON, *CASES[case]), kind)
    assert monitor["apiVersion"] == f"{definition['group']}/v1" and kind == definition["kind"]
    jsonschema.Draft7Validator(definition["schema"]).validate(monitor)
    assert _unknown_fields(monitor, definition["schema"]) == []


# --- network policy and dashboard ConfigMap ------------------------------------------------


def test_network_policy_opens_only_the_engines_metrics_port(helm, validate_k8s) -> None:
    objects = render(helm, "--set", "monitoring.networkPolicy.enabled=true")
    policy = one(objects, "NetworkPolicy")
    assert validate_k8s([policy]) == []
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] and rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    for deployment in [o for o in desired_of(objects) if o["kind"] == "Deployment"]:
        template = deployment["spec"]["template"]
        engine = template["metadata"]["labels"][L.ROLE_LABEL] in L.ENGINE_ROLES
        assert selects(policy["spec"]["podSelector"], template["metadata"]["labels"]) is engine
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ("metrics" in ports) is engine


def test_dashboard_config_map_carries_the_json_for_the_sidecar(helm, validate_k8s) -> None:
    objects = render(
        helm, "--set", "monitoring.dashboard.enabled=true",
        "--set", "monitoring.dashboard.namespace=monitoring",
    )  # fmt: skip
    config_map = one(objects, "ConfigMap")
    assert validate_k8s([config_map]) == []
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"splitserve.json": DASHBOARD.read_text()}


# --- the dashboard -------------------------------------------------------------------------

GAUGES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "splitserve:kv_blocks_unaccounted", "splitserve:engine_serving",
    "splitserve_router_inflight_requests", "splitserve_router_ready_pods",
}  # fmt: skip
COUNTERS = {  # as scraped: with _total
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:nixl_num_failed_transfers_total",
    "splitserve_router_requests_total", "splitserve_router_retries_total",
}  # fmt: skip
HISTOGRAMS = {  # used as NAME_bucket, NAME_sum, NAME_count
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
    "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
    "vllm:iteration_tokens_total", "vllm:nixl_xfer_time_seconds",
    "vllm:nixl_bytes_transferred", "splitserve_router_request_seconds",
    "splitserve_router_time_to_first_token_seconds",
}  # fmt: skip
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KNOWN_SERIES = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in HISTOGRAM_SUFFIXES}
# Engine metrics carry model_name; the router's and the KV pulls' (vllm:nixl_*) do not.
UNMODELLED = ("splitserve_router_", "vllm:nixl_")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "bool", "and", "or", "unless", "offset"}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\)$")


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers left once strings, label
    matchers, ranges and grouping lists are gone, that are neither functions nor keywords."""
    text = _STRING.sub('""', expr)
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", text)))
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # the exponent of a number such as 1e-9
            continue
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and the variables' label_values queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            assert match, query
            exprs.append(match.group(1))
    return exprs


def test_metric_name_extraction_sees_unknown_names() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, role) (rate(foo_bucket{a="b{c}"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"foo_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / clamp_min(sum(b), 1e-9) > bool 0") == {
        "a_total", "b"
    }  # fmt: skip


def test_dashboard_loads_and_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "splitserve" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "inferenceservice", "model_name"} <= variables
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_dashboard_uses_only_known_metrics_and_all_of_them() -> None:
    used: set[str] = set()
    for expr in _exprs(_dashboard()):
        names = metric_names(expr)
        assert names, expr
        assert names <= KNOWN_SERIES, f"unknown metric in {expr!r}: {names - KNOWN_SERIES}"
        used |= names
    bases = {n.removesuffix(s) for n in used for s in HISTOGRAM_SUFFIXES if n.endswith(s)}
    assert (GAUGES | COUNTERS) - used == set()
    assert HISTOGRAMS - bases == set()


def test_every_panel_is_scoped_to_one_inferenceservice() -> None:
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert (
                'namespace="$namespace"' in expr and 'inferenceservice="$inferenceservice"' in expr
            )
            modelled = not any(n.startswith(UNMODELLED) for n in metric_names(expr))
            assert ('model_name=~"$model_name"' in expr) is modelled, expr


class _IdleEngine:
    """Enough of an engine for its metrics to be collected (EngineState)."""

    def stats(self):
        from splitserve.engine.engine_core import EngineStats
        from splitserve.engine.histogram import HistogramSnapshot

        steps = HistogramSnapshot((1.0, float("inf")), cumulative_counts=(0, 0), total=0.0)
        return EngineStats(
            num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks=8, num_free_blocks=8,
            prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, step_tokens=steps,
        )  # fmt: skip

    def audit(self):
        from splitserve.engine.engine_core import KVAudit

        return KVAudit(used_blocks=0, accounted_blocks=0, held_requests=0)

    def health(self):
        from splitserve.engine.async_engine import EngineHealth

        return EngineHealth(serving=True)


def _series(registry) -> set[str]:
    """The names a registry's families are scraped as (labelled ones before any sample)."""
    suffixes = {"counter": ("_total",), "histogram": HISTOGRAM_SUFFIXES}
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_known_metrics_are_what_the_servers_export() -> None:
    # Imported here: the engine's metrics pull in torch, which only this test needs.
    from prometheus_client import CollectorRegistry

    from splitserve.kvtransfer.metrics import TransferMetrics
    from splitserve.services.common.metrics import EngineMetrics
    from splitserve.services.router.metrics import RouterMetrics

    engine = EngineMetrics(CollectorRegistry(), _IdleEngine(), "m", "decode")
    exported = _series(engine.registry) | _series(RouterMetrics().registry)
    exported |= _series(TransferMetrics().registry)
    assert KNOWN_SERIES - exported == set()


# --- Argo CD health ------------------------------------------------------------------------


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run manifests/argocd/health.lua as Argo CD does: `obj` a global, `hs` returned."""
    lupa = pytest.importorskip("lupa")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute(HEALTH_LUA.read_text())
    return {"status": result["status"], "message": result["message"]}


def _dep(desired: int, ready: int, updated: int, total: int | None = None, **status: Any):
    counts = {"replicas": desired if total is None else total, "readyReplicas": ready}
    return {"status": counts | {"updatedReplicas": updated} | status}


def _crash_looping_pod() -> dict[str, Any]:
    last = {"terminated": {"exitCode": 1, "message": "Traceback\nValueError: no model at /m"}}
    container = {"name": "engine", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
    return {
        "metadata": {"name": "chat-decode-x", "labels": {L.ROLE_LABEL: L.DECODE}},
        "status": {"containerStatuses": [container | {"lastState": last}]},
    }


ROLLED_OUT = {"prefill": _dep(1, 1, 1), "decode": _dep(2, 2, 2), "router": _dep(1, 1, 1)}
STUCK = {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
HEALTH_CASES = {
    "healthy": (dict(ROLLED_OUT), {}, "Healthy", "decode 2/2 ready"),
    "rolling out": (dict(ROLLED_OUT, decode=_dep(2, 2, 1, total=3)), {}, "Progressing",
                    "decode 1/2 updated"),
    "pods not ready": (dict(ROLLED_OUT, decode=_dep(2, 1, 2)), {}, "Progressing", "decode"),
    "rollout stuck": (dict(ROLLED_OUT, decode=_dep(2, 1, 1, conditions=[STUCK])), {},
                      "Degraded", "RolloutStuck: decode: ProgressDeadlineExceeded"),
    "pods failing": (dict(ROLLED_OUT, decode=_dep(2, 1, 2)),
                     {"failing": pod_problems([_crash_looping_pod()])}, "Degraded",
                     "PodsFailing: pod chat-decode-x (decode) container engine: CrashLoopBackOff"),
    "apply failed": (dict(ROLLED_OUT), {"problem": ("ApplyFailed", "forbidden")}, "Degraded",
                     "ApplyFailed: forbidden"),
}  # fmt: skip


@pytest.mark.parametrize("case", HEALTH_CASES)
def test_argocd_health_follows_the_operators_conditions(make_isvc, case) -> None:
    deployments, extra, want, message = HEALTH_CASES[case]
    body = make_isvc()
    status = compute_status(parse(body), deployments, {}, "t", **extra)
    health = argocd_health(body | {"status": status})
    assert health["status"] == want and message in health["message"], health


def test_argocd_health_waits_for_the_operator(make_isvc) -> None:
    body = make_isvc()
    assert argocd_health(body)["status"] == "Progressing"  # no status yet
    status = compute_status(parse(body), ROLLED_OUT, {}, "t")
    newer = body | {"metadata": body["metadata"] | {"generation": 9}, "status": status}
    health = argocd_health(newer)  # synced a new spec; the status is of the old one
    assert health == {"status": "Progressing", "message": health["message"]}
    assert "generation 9" in health["message"]


def test_argocd_health_reports_an_invalid_spec(make_isvc) -> None:
    body = make_isvc()
    healthy = compute_status(parse(body), ROLLED_OUT, {}, "t")
    status = invalid_spec_status(3, "spec.engine.blockSize: 12 is not one of ...", healthy, "t")
    health = argocd_health(body | {"status": status})
    assert health["status"] == "Degraded" and health["message"].startswith("InvalidSpec: spec.")


def test_docs_argocd_snippet_is_the_health_check_file() -> None:
    text = (REPO / "docs" / "observability.md").read_text()
    key = f"resource.customizations.health.{crd.GROUP}_{crd.KIND}"
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    (argocd_cm,) = [b for b in blocks if (b.get("metadata") or {}).get("name") == "argocd-cm"]
    assert argocd_cm["data"][key] == HEALTH_LUA.read_text()
