"""The process boundaries hold: contracts import no torch, and a router process never maps
libtorch, even after it loaded its tokenizer from an engine and served a request."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

TORCH_FREE = [
    "splitserve.protocol",
    "splitserve.protocol.sampling",
    "splitserve.protocol.wire",
    "splitserve.protocol.kv_compat",
    "splitserve.protocol.block_hash",
    "splitserve.protocol.constants",
    "splitserve.protocol.labels",
    "splitserve.protocol.tokenizer_files",
    "splitserve.services.router.app",
    "splitserve.services.router.main",
    "splitserve.operator.handlers",
    "splitserve.operator.cli",
]


def test_contracts_router_and_operator_import_no_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(loaded), loaded[:5])\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0 "), out.stdout


def test_router_process_maps_no_libtorch(fake_pods, tmp_path):
    """A router started with no model learns the tokenizer from the pods' GetInfo, serves, and
    never loads torch (it would map ~400 MB of libtorch for nothing)."""
    from splitserve.processes import free_port, spawn, splitserve_argv, stop

    prefill, decode = fake_pods(["prefill", "decode"])
    port = free_port()
    argv = splitserve_argv(
        "router", "--port", str(port), "--stats-interval", "0.1",
        "--prefill-endpoints", prefill.address, "--decode-endpoints", decode.address,
    )  # fmt: skip
    proc = spawn(argv, output=(tmp_path / "router.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc)
        body = {"model": "m", "prompt": "Hello there", "max_tokens": 3}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        tokens = httpx.post(url + "/tokenize", json={"prompt": "Hello there"}, timeout=30).json()
        assert tokens["count"] == 2 and tokens["max_model_len"] == 8192  # the pods' facts
        assert not _maps_libtorch(proc.pid)
    finally:
        stop([proc])


def _maps_libtorch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _wait(url: str, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "router exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("router never became healthy")
