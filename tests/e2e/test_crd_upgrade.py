"""Upgrading the CRD as the chart's README says (issue 18, item 6), on the real API server.

Helm installed the CRD from the chart's `crds/` folder; an older version of it is simulated by
editing the installed CRD (its category and a field's description gone). Then:

1. `helm upgrade` of the release leaves the CRD as it is (Helm's rule for `crds/`), which is
   why the README needs a step of its own;
2. that step, `kubectl apply --server-side --force-conflicts -f charts/splitserve-operator/crds/`,
   brings it back to the chart's file, taking the fields over from Helm's field manager;
3. the alternative, `splitserve operator crd | kubectl apply --server-side --force-conflicts -f -`,
   applies the same document (a no-op by then, and no conflict).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import e2e_support as S
import pytest

from splitserve.operator import crd

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
CRD = "customresourcedefinition/inferenceservices.serving.splitserve.io"


def _crd(kubeconfig: Path) -> dict:
    get = ["get", CRD, "-o", "json", "--show-managed-fields"]
    out = S.checked(S.run_tool("kubectl", *get, kubeconfig=kubeconfig))
    return json.loads(out)


def _uri_description(obj: dict) -> str:
    (version,) = obj["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["model"]["properties"]["uri"].get("description", "")


def _shell(command: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    path = f"{S.TOOLS}:{S.REPO / '.venv' / 'bin'}:{os.environ['PATH']}"
    env = os.environ | {"KUBECONFIG": str(kubeconfig), "PATH": path}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=S.REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_crd_upgrade_steps_of_the_chart_readme(operator: str, kubeconfig: Path) -> None:
    ours = crd.load_crd()
    assert _crd(kubeconfig)["spec"]["names"]["categories"] == ["splitserve"]
    old = [
        {"op": "remove", "path": "/spec/names/categories"},
        {"op": "replace", "path": "/spec/versions/0/schema/openAPIV3Schema/properties/spec/"
         "properties/model/properties/uri/description", "value": "an older description"},
    ]  # fmt: skip
    patch = ["patch", CRD, "--type=json", "-p", json.dumps(old)]
    S.checked(S.run_tool("kubectl", *patch, kubeconfig=kubeconfig))
    try:
        # 1. helm upgrade does not touch the CRD.
        upgrade = ["upgrade", "splitserve-operator", str(S.REPO / "charts" / "splitserve-operator"),
                   "-n", operator, "--reuse-values", "--wait"]  # fmt: skip
        S.checked(S.run_tool("helm", *upgrade, kubeconfig=kubeconfig, timeout=360))
        stale = _crd(kubeconfig)
        assert "categories" not in stale["spec"]["names"]
        assert _uri_description(stale) == "an older description"

        # 2. The README's step.
        step = "kubectl apply --server-side --force-conflicts -f charts/splitserve-operator/crds/"
        readme = (S.REPO / "charts" / "splitserve-operator" / "README.md").read_text()
        assert step in readme
        done = _shell(step, kubeconfig)
        assert done.returncode == 0, done.stderr
        fresh = _crd(kubeconfig)
        assert fresh["spec"]["names"]["categories"] == ["splitserve"]
        assert _uri_description(fresh) == _uri_description(ours)
        managers = {m["manager"] for m in fresh["metadata"]["managedFields"]}
        assert "kubectl" in managers

        # 3. The CLI's copy is the same document: applying it changes no field of the spec (the
        #    generation counts spec changes; the status moves on its own after step 2).
        alternative = "splitserve operator crd | kubectl apply --server-side --force-conflicts -f -"
        assert alternative in readme
        generation = fresh["metadata"]["generation"]
        done = _shell(alternative, kubeconfig)
        assert done.returncode == 0, done.stderr
        assert _crd(kubeconfig)["metadata"]["generation"] == generation
    finally:
        _shell("kubectl apply --server-side --force-conflicts -f charts/splitserve-operator/crds/",
               kubeconfig)  # fmt: skip
