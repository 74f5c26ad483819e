"""The README quickstart, run exactly as written on the CPU-only cluster (issue 18, item 7).

The commands between the README's `<!-- quickstart -->` markers are read from the README and
run one by one with bash, from the repository root, as a newcomer would: the chart installed
into `splitserve-system`, the colocated example applied to the `default` namespace, the model
asked through the API server's service proxy, everything removed again. The test adds nothing
to the commands; what it provides around them:

- the session's own operator is uninstalled first (two operators must never reconcile the same
  objects; the next module installs it again);
- `default` carries the hub-route label while the commands run: the example's `hf://` weights
  come from the hub emulator, which the download step reaches through the test's webhook
  (hub_route.py), since nothing outside this machine is reachable;
- `helm` and `kubectl` are the ones from `make tools`, first on PATH, with the cluster's
  admin kubeconfig.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import e2e_support as S
import pytest
from hub_route import ROUTE_LABEL, ROUTE_VALUE, HubRoute

from splitserve.cluster.controlplane.testing import wait_until

# Several engines start at once on two shared cores: more than the suite's default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]
README = S.REPO / "README.md"


def quickstart_commands(text: str) -> list[str]:
    """The commands of the README's quickstart block: comments dropped, continuations joined."""
    block = re.search(
        r"<!-- quickstart.*?-->\s*```bash\n(.*?)```\s*<!-- /quickstart -->", text, re.S
    )
    assert block, "README.md has no quickstart block between its markers"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_the_quickstart_block_is_what_the_test_runs() -> None:
    commands = quickstart_commands(README.read_text())
    assert commands[0].startswith("helm install splitserve-operator charts/splitserve-operator")
    assert "manifests/examples/colocated-small.yaml" in commands[1]
    assert commands[-1].startswith("helm uninstall splitserve-operator")
    # CPU only, no Secret: the example asks for no GPU and names no Secret.
    (doc,) = S.example_documents(S.EXAMPLES / "colocated-small.yaml")
    spec = doc["spec"]
    assert "credentials" not in spec["model"] and "apiKeySecret" not in spec.get("router", {})
    resources = [spec.get(role, {}).get("resources", {}) for role in ("prefill", "decode")]
    assert not [k for r in resources for kind in r.values() for k in kind if "gpu" in k]


def _run(command: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"KUBECONFIG": str(kubeconfig), "PATH": f"{S.TOOLS}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=S.REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip


@pytest.fixture
def newcomer_cluster(operator_install, core, kubeconfig: Path, hub_route: HubRoute):
    """The cluster as a newcomer's: no operator installed; `default` routed to the emulated hub."""
    operator_install.remove()
    patch = {"metadata": {"labels": {ROUTE_LABEL: ROUTE_VALUE}}}
    core.patch_namespace("default", patch)
    yield
    core.patch_namespace("default", {"metadata": {"labels": {ROUTE_LABEL: None}}})
    # Should a command have failed half way, leave no quickstart objects behind.
    example = str(S.EXAMPLES / "colocated-small.yaml")
    S.run_tool("kubectl", "delete", "-f", example, "--ignore-not-found", kubeconfig=kubeconfig)
    S.run_tool("helm", "uninstall", "splitserve-operator", "-n", "splitserve-system",
               "--ignore-not-found", kubeconfig=kubeconfig)  # fmt: skip


def test_readme_quickstart_runs_as_written(newcomer_cluster, kubeconfig: Path, offline) -> None:
    commands = quickstart_commands(README.read_text())
    outputs: list[str] = []
    for command in commands:
        done = _run(command, kubeconfig)
        assert done.returncode == 0, (
            f"{command}\nexited {done.returncode}:\n{done.stderr}{done.stdout}"
        )
        outputs.append(done.stdout)
    by_command = dict(zip(commands, outputs, strict=True))

    table = next(out for cmd, out in by_command.items() if cmd.startswith("kubectl get ssvc"))
    header, row = table.splitlines()[:2]
    columns = dict(zip(header.split(), row.split(), strict=True))
    assert columns["READY"] == "True" and columns["DECODE"] == "2/2", table

    listing = next(out for cmd, out in by_command.items() if cmd.endswith("/v1/models"))
    names = [m["id"] for m in json.loads(listing)["data"]]
    assert names == ["HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"]

    answer = next(out for cmd, out in by_command.items() if "/v1/completions" in cmd)
    completion = json.loads(answer)
    prompt = json.loads(re.search(r"echo '(\{.*?\})'", next(
        c for c in commands if "/v1/completions" in c)).group(1))["prompt"]  # fmt: skip
    assert completion["choices"][0]["text"] == offline.text(prompt)
    assert completion["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    # Cleaned up by its own last commands: no InferenceService, no operator pods.
    def gone() -> bool:
        pods = S.run_tool("kubectl", "get", "pods", "-A", "-o", "name", kubeconfig=kubeconfig)
        return "smollm2" not in pods.stdout and "splitserve-operator" not in pods.stdout

    wait_until("the quickstart's pods gone", gone, timeout=180)
