"""Env vars and argv as kubelet builds them: $(VAR) expansion, precedence, downward API."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from splitserve.cluster.nodeagent import downward, envvars
from splitserve.cluster.nodeagent.command import container_argv
from splitserve.cluster.nodeagent.envvars import EnvContext, expand, lookup_in


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x$(A)y$(B)z", "x1y2z"),
        ("$(MISSING)", "$(MISSING)"),  # unknown names stay as written
        ("$$(A)", "$(A)"),  # $$ escapes the reference
        ("$$", "$"),
        ("a$", "a$"),  # a trailing $ is literal
        ("$x", "$x"),  # a $ not followed by ( or $
        ("$(A", "$(A"),  # incomplete reference kept
        ("$()", "$()"),
        ("", ""),
    ],
)
def test_expand_matches_kubelet(text: str, expected: str) -> None:
    assert expand(text, lookup_in({"A": "1", "B": "2"})) == expected


class FakeObjects:
    def __init__(self) -> None:
        self.maps: dict[str, dict[str, Any]] = {
            "cfg": {"data": {"MODE": "fast", "bad-name!": "x", "LEVEL": "3"}}
        }
        self.secrets: dict[str, dict[str, Any]] = {
            "sec": {"data": {"TOKEN": base64.b64encode(b"s3cret").decode()}}
        }

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.maps.get(name)

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.secrets.get(name)


POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"}},
    "spec": {"nodeName": "node-0", "serviceAccountName": "sa", "containers": []},
}
CTX = EnvContext(
    pod_ip="10.244.0.7",
    host_ip="10.244.0.1",
    node_allocatable={"cpu": "16", "memory": "64Gi"},
    service_env={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "WEB_SERVICE_HOST": "10.96.0.9"},
)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return envvars.container_env(POD, {"name": "c"} | container, CTX, FakeObjects())


def test_env_order_expansion_and_precedence() -> None:
    env = env_of(
        {
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "A", "value": "a"},
                {"name": "B", "value": "$(A)-$(CFG_MODE)-$(WEB_SERVICE_HOST)-$(LATER)"},
                {"name": "LATER", "value": "l"},
                {"name": "CFG_LEVEL", "value": "override"},
                {"name": "KUBERNETES_SERVICE_HOST", "value": "mine"},
            ],
        }
    )
    # Only names defined before a variable expand in it; later ones stay literal.
    assert env["B"] == "a-fast-10.96.0.9-$(LATER)"
    assert env["CFG_MODE"] == "fast" and env["CFG_LEVEL"] == "override"
    assert "CFG_bad-name!" not in env  # invalid env names from envFrom are skipped
    # The pod's own variables win over the service variables, which fill in the rest.
    assert env["KUBERNETES_SERVICE_HOST"] == "mine" and env["WEB_SERVICE_HOST"] == "10.96.0.9"


def test_value_from_downward_api_and_objects() -> None:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    env = env_of(
        {
            "resources": {"limits": {"memory": "4Gi"}, "requests": {"cpu": "500m"}},
            "env": [
                {"name": "NAME", "valueFrom": field("metadata.name")},
                {"name": "NS", "valueFrom": field("metadata.namespace")},
                {"name": "UID", "valueFrom": field("metadata.uid")},
                {"name": "IP", "valueFrom": field("status.podIP")},
                {"name": "HOST", "valueFrom": field("status.hostIP")},
                {"name": "NODE", "valueFrom": field("spec.nodeName")},
                {"name": "SA", "valueFrom": field("spec.serviceAccountName")},
                {"name": "APP", "valueFrom": field("metadata.labels['app']")},
                {
                    "name": "MEM",
                    "valueFrom": {
                        "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}
                    },
                },
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
                {
                    "name": "CPU_LIMIT",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}},
                },
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
                {
                    "name": "GONE",
                    "valueFrom": {"secretKeyRef": {"name": "nope", "key": "K", "optional": True}},
                },
            ],
        }
    )
    assert env["NAME"] == "p" and env["NS"] == "ns" and env["UID"] == "u-1"
    assert env["IP"] == "10.244.0.7" and env["HOST"] == "10.244.0.1"
    assert env["NODE"] == "node-0" and env["SA"] == "sa" and env["APP"] == "a"
    assert env["MEM"] == "4096" and env["CPU"] == "1"  # rounded up, as kubelet does
    assert env["CPU_LIMIT"] == "16"  # no limit: the node's allocatable
    assert env["MODE"] == "fast" and env["TOKEN"] == "s3cret"
    assert "GONE" not in env


def test_missing_references_are_configuration_errors() -> None:
    with pytest.raises(envvars.ConfigError, match="not found"):
        env_of(
            {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "no", "key": "k"}}}]}
        )
    with pytest.raises(envvars.ConfigError, match="couldn't find key"):
        env_of(
            {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}]}
        )
    with pytest.raises(envvars.ConfigError):
        env_of({"envFrom": [{"secretRef": {"name": "missing"}}]})
    assert env_of({"envFrom": [{"secretRef": {"name": "missing", "optional": True}}]}) == dict(
        CTX.service_env
    )


def test_service_variables_like_kubelet() -> None:
    svc = envvars.ServiceAddress(
        "my-web", "10.96.0.9", (("http", 80, "TCP"), ("metrics", 9090, "TCP"))
    )
    env = envvars.service_variables([svc, envvars.ServiceAddress("headless", "None", ())])
    assert env == {
        "MY_WEB_SERVICE_HOST": "10.96.0.9",
        "MY_WEB_SERVICE_PORT": "80",
        "MY_WEB_SERVICE_PORT_HTTP": "80",
        "MY_WEB_SERVICE_PORT_METRICS": "9090",
        "MY_WEB_PORT": "tcp://10.96.0.9:80",
        "MY_WEB_PORT_80_TCP": "tcp://10.96.0.9:80",
        "MY_WEB_PORT_80_TCP_PROTO": "tcp",
        "MY_WEB_PORT_80_TCP_PORT": "80",
        "MY_WEB_PORT_80_TCP_ADDR": "10.96.0.9",
        "MY_WEB_PORT_9090_TCP": "tcp://10.96.0.9:9090",
        "MY_WEB_PORT_9090_TCP_PROTO": "tcp",
        "MY_WEB_PORT_9090_TCP_PORT": "9090",
        "MY_WEB_PORT_9090_TCP_ADDR": "10.96.0.9",
    }


def test_process_env_layers_image_hostname_pod() -> None:
    image = {"PATH": "/venv/bin:/usr/bin", "HOME": "/home/splitserve", "PYTHONSAFEPATH": "1"}
    env = envvars.process_env(image, "pod-a", {"HOME": "/tmp", "X": "1"})
    assert env == {
        "PATH": "/venv/bin:/usr/bin",
        "HOME": "/tmp",
        "PYTHONSAFEPATH": "1",
        "HOSTNAME": "pod-a",
        "X": "1",
    }


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        (None, None, ["splitserve", "--help"]),  # the image's ENTRYPOINT + CMD
        (None, ["router", "--port", "$(PORT)"], ["splitserve", "router", "--port", "8000"]),
        (["python", "-m", "http.server"], None, ["python", "-m", "http.server"]),  # CMD dropped
        (["sh", "-c"], ["echo $(PORT) $$(PORT)"], ["sh", "-c", "echo 8000 $(PORT)"]),
        (None, [], ["splitserve", "--help"]),  # empty args = unset
    ],
)
def test_command_and_args_over_entrypoint_and_cmd(
    command: list[str] | None, args: list[str] | None, expected: list[str]
) -> None:
    argv = container_argv(["splitserve"], ["--help"], command, args, {"PORT": "8000"})
    assert argv == expected


def test_no_command_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no command"):
        container_argv([], [], None, None, {})


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", "0.5"), ("4Gi", str(4 * 2**30)), ("1.5", "1.5"), ("2e3", "2000"), ("1k", "1000")],
)
def test_quantities(text: str, value: str) -> None:
    from decimal import Decimal

    assert downward.quantity(text) == Decimal(value)


def test_volume_form_of_labels() -> None:
    pod = {"metadata": {"labels": {"b": "2", "a": 'q"uote'}}, "spec": {}}
    text = downward.pod_field(pod, "metadata.labels", host_ip="", pod_ip="")
    assert text == 'a="q\\"uote"\nb="2"'
