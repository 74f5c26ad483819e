"""`splitserve serve` planning and `splitserve router` flags (pure: no processes)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from splitserve import serve as local_stack
from splitserve.services.router import main as router_main


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _router_flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_disaggregated_plan_wires_every_engine_into_the_router():
    args = parse(local_stack, ["--prefill-replicas", "2", "--decode-replicas", "3", "--port", "9"])
    engines, router = local_stack.plan(args)
    roles = [c.argv[0] for c in engines]
    assert roles == ["prefill", "prefill", "decode", "decode", "decode"]
    assert len({c.port for c in engines} | {c.metrics_port for c in engines}) == 10
    prefill = _router_flag(router.argv, "--prefill-endpoints").split(",")
    decode = _router_flag(router.argv, "--decode-endpoints").split(",")
    assert prefill == [f"127.0.0.1:{c.port}" for c in engines[:2]]
    assert decode == [f"127.0.0.1:{c.port}" for c in engines[2:]]
    assert _router_flag(router.argv, "--port") == "9"
    for c in engines:
        assert _router_flag(c.argv, "--kv-transport") == "grpc"
        assert _router_flag(c.argv, "--metrics-port") == str(c.metrics_port)


def test_colocated_plan_and_engine_flags():
    args = parse(
        local_stack,
        ["--colocated", "--decode-replicas", "2", "--kv-transport", "nixl", "--model", "/m",
         "--max-model-len", "512", "--api-key-file", "keys.txt", "--policy", "least_load"],
    )  # fmt: skip
    engines, router = local_stack.plan(args)
    assert all(c.argv[0] == "decode" and "--colocated" in c.argv for c in engines)
    assert len(engines) == 2
    assert "--prefill-endpoints" not in router.argv
    assert len(_router_flag(router.argv, "--colocated-endpoints").split(",")) == 2
    assert "--model" not in router.argv  # the router learns the model from the engines
    assert _router_flag(router.argv, "--max-model-len") == "512"
    # The router gets the key file's path; keys themselves never appear on a command line.
    assert _router_flag(router.argv, "--api-key-file") == str(Path("keys.txt").resolve())
    assert "--api-key" not in router.argv
    assert _router_flag(router.argv, "--policy") == "least_load"
    assert _router_flag(engines[0].argv, "--kv-transport") == "nixl"
    assert _router_flag(engines[0].argv, "--model") == "/m"


def test_child_env_splits_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(local_stack.os, "cpu_count", lambda: 8)
    assert local_stack.child_env(3, None)["OMP_NUM_THREADS"] == "2"
    assert local_stack.child_env(16, None)["OMP_NUM_THREADS"] == "1"
    assert local_stack.child_env(2, 3)["OMP_NUM_THREADS"] == "3"
    assert local_stack.child_env(1, None)["PYTHONSAFEPATH"] == "1"


@pytest.mark.parametrize("colocated", [False, True])
def test_router_parses_the_argv_the_operator_builds(colocated):
    """The operator's router Deployment args parse, with the selectors and port it expects."""
    from splitserve.operator import spec
    from splitserve.operator.builders import router as router_builder

    obj = {
        "apiVersion": "serving.splitserve.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u"},
        "spec": {
            "model": {"uri": "pvc://weights/smollm2", "revision": "abc"},
            "image": "registry.example/splitserve:0.1.0",
            "prefill": {"replicas": 0 if colocated else 1},  # no prefill pool: colocated
            "decode": {"replicas": 1},
        },
    }
    isvc = spec.parse(obj)
    argv = router_builder.router_args(isvc)
    assert argv[0] == "router"
    args = parse(router_main, argv[1:])
    assert args.discovery == "kubernetes" and args.namespace == "ml"
    assert args.port == router_builder.HTTP_PORT
    assert (args.prefill_selector == args.decode_selector) is colocated
    assert "serving.splitserve.io/role=decode" in args.decode_selector


def test_api_keys_from_file_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text("k2\n\n  k3 \n")
    keys = router_main.read_api_keys(str(f), "k4,k5\nk6")
    assert keys.current() == frozenset({"k2", "k3", "k4", "k5", "k6"})
    assert keys.check("Bearer k3") and keys.check("bearer  k6 ")
    assert not keys.check("Bearer k7") and not keys.check("k2") and not keys.check("Basic k2")
    none = router_main.read_api_keys(None, None)
    assert not none.enabled and none.current() == frozenset()


def test_the_router_refuses_a_key_on_its_command_line():
    args = parse(router_main, ["--colocated-endpoints", "127.0.0.1:1", "--api-key", "sk-x"])
    with pytest.raises(SystemExit, match="api-key-file"):
        router_main.run(args)


def test_key_file_is_reread_when_the_secret_changes(tmp_path):
    from splitserve.services.router.auth import ApiKeys

    f = tmp_path / "keys"
    f.write_text("old\n")
    now = [0.0]
    keys = ApiKeys((), str(f), recheck_s=5, clock=lambda: now[0])
    assert keys.check("Bearer old")
    f.write_text("new\n")
    os.utime(f, (1e9, 1e9))
    assert keys.check("Bearer old")  # not re-checked yet
    now[0] = 6.0
    assert keys.check("Bearer new") and not keys.check("Bearer old")
    f.unlink()  # mid-swap: keep the last keys
    now[0] = 12.0
    assert keys.check("Bearer new")
    assert keys.enabled and not ApiKeys().enabled


def test_static_mode_needs_endpoints():
    args = parse(router_main, ["--prefill-endpoints", "a:1"])
    with pytest.raises(SystemExit):
        router_main.run(args)


def test_serve_rejects_zero_replicas(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(local_stack, ["--prefill-replicas", "0"])
    assert exit_.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_api_keys_never_go_on_a_command_line(tmp_path, monkeypatch):
    """`serve --api-key` is refused with what to use instead; the environment is inherited."""
    args = parse(local_stack, ["--api-key", "sk-secret"])
    problem = local_stack.preflight(args)
    assert problem is not None and "--api-key-file" in problem and "SPLITSERVE_API_KEYS" in problem
    monkeypatch.setenv("SPLITSERVE_API_KEYS", "k1,k2")
    args = parse(local_stack, [])
    _, router = local_stack.plan(args)
    assert not [a for a in router.argv if "k1" in a]
    assert local_stack.router_env(args)["SPLITSERVE_API_KEYS"] == "k1,k2"
    missing = parse(local_stack, ["--api-key-file", str(tmp_path / "none")])
    assert "no such file" in local_stack.preflight(missing)


def test_served_names_are_repeatable_for_aliases():
    args = parse(local_stack, ["--served-name", "org/model", "--served-name", "model"])
    _, router = local_stack.plan(args)
    names = [router.argv[i + 1] for i, a in enumerate(router.argv) if a == "--served-name"]
    assert names == ["org/model", "model"]
