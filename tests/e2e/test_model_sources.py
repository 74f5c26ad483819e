"""Model sources on the real cluster: hf:// with a token Secret into a shared cache, s3://,
oci:// image volumes, and a download that fails (issue 18, item 2).

What is real: the API server, scheduler, controllers and the operator from its chart; the pods'
download step (`splitserve pull-model` in an init container, with the real huggingface_hub and
boto3 clients), the shared cache claim (a real PV/PVC pair), the engines and router serving.
What is emulated, because nothing outside this machine is reachable: the hub is the hub
emulator (tests/fixtures/hub_emulator.py, the same files under a gated repository id), the
object store is moto's S3-compatible server (PyPI `moto[server]`), both on the host where pods
reach it at the bridge's address; the OCI registry is replaced by the node's image store, into
which the test loads a ModelCar-layout image it built (cluster/ociimages.py), as `kind load`
would: the node agent mounts it as an image volume, nothing is pulled.

Every InferenceService is created at once (their engines start together), then checked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import e2e_support as S
import pytest
from hub_route import GATED_REPO, GATED_TOKEN, HubRoute
from kubernetes import client

from splitserve.cluster import models, ociimages
from splitserve.cluster.controlplane.testing import wait_until

# Several engines start at once on two shared cores: more than the suite's default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]

OCI_REFERENCE = "registry.splitserve.test/models/smollm2:135m-instruct"
BUCKET = "models"
S3_PREFIX = "smollm2/135m-instruct"
CACHE_CLAIM = "model-cache"


def colocated(name: str, model: dict, decode: int = 1) -> dict:
    body = S.isvc_body(name, prefill=0, decode=decode)
    body["spec"]["model"] = {"servedName": "smollm2"} | model
    return body


@pytest.fixture(scope="module")
def s3_endpoint(model_dir: Path, cluster) -> str:
    """moto's S3 server on the host (its own process: it streams the weights to the pod while
    this one polls), holding the model under a prefix; its URL as pods see it."""
    from splitserve.processes import free_port, spawn, stop
    from splitserve.storage import s3 as s3_client

    port = free_port()
    moto = str(S.REPO / ".venv" / "bin" / "moto_server")
    server = spawn([moto, "-H", "0.0.0.0", "-p", str(port)], output=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "e2e",
           "AWS_SECRET_ACCESS_KEY": "e2e-secret"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3 = s3_client.client()
        wait_until("moto's S3 server answers", lambda: s3.list_buckets() is not None, timeout=60)
        s3.create_bucket(Bucket=BUCKET)
        for path in model_dir.iterdir():
            if path.is_file() and not path.name.startswith("."):
                s3.upload_file(str(path), BUCKET, f"{S3_PREFIX}/{path.name}")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield f"http://{cluster.spec.host_ip}:{port}"
    stop([server], 10)


@pytest.fixture(scope="module")
def oci_image(model_dir: Path, tmp_path_factory) -> str:
    """A ModelCar-layout image of the model (files under /models), loaded onto the node."""
    layout = tmp_path_factory.mktemp("oci-layout")
    ociimages.build_model_layout(model_dir, layout, OCI_REFERENCE)
    return ociimages.Store().load(layout, OCI_REFERENCE)


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    """The shared download cache's folder on the host (a ReadWriteMany hostPath PV)."""
    folder = S.REPO / ".cache" / "cluster" / f"model-cache-{S.unique('t')}"
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # pods write as uid 10001
    return folder


@pytest.fixture(scope="module")
def sources(
    namespaces: S.Namespaces,
    core: client.CoreV1Api,
    custom,
    hub_route: HubRoute,
    s3_endpoint: str,
    oci_image: str,
    cache_dir: Path,
) -> dict[str, S.Isvc]:
    made = {}
    commit = hub_route.hub.repos[GATED_REPO].commit
    hub_route.hub.downloads.clear()

    ns = namespaces.create("hf-gated", model_claim=False)
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="hf-token"),
                             string_data={"HF_TOKEN": GATED_TOKEN})  # fmt: skip
    core.create_namespaced_secret(ns, secret)
    pv, pvc = models.volume_manifests(ns, cache_dir, CACHE_CLAIM, access_mode="ReadWriteMany")
    core.create_persistent_volume(pv)
    core.create_namespaced_persistent_volume_claim(ns, pvc)
    model = {
        "uri": f"hf://{GATED_REPO}",
        "revision": commit,
        "credentials": {"secretName": "hf-token"},
        "endpoint": hub_route.endpoint,
        "cache": {"claimName": CACHE_CLAIM},
    }
    made["hf"] = S.Isvc.create(custom, ns, colocated("gated", model, decode=2))

    ns = namespaces.create("hf-notoken", model_claim=False)
    model = {"uri": f"hf://{GATED_REPO}", "endpoint": hub_route.endpoint}
    body = colocated("notoken", model)
    body["spec"]["router"]["nodeSelector"] = {S.NO_NODE_LABEL: "true"}  # no router needed
    made["denied"] = S.Isvc.create(custom, ns, body)

    ns = namespaces.create("s3", model_claim=False)
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="s3-credentials"),
        string_data={"AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret"},
    )
    core.create_namespaced_secret(ns, secret)
    model = {"uri": f"s3://{BUCKET}/{S3_PREFIX}", "endpoint": s3_endpoint,
             "credentials": {"secretName": "s3-credentials"}}  # fmt: skip
    made["s3"] = S.Isvc.create(custom, ns, colocated("objects", model))

    ns = namespaces.create("oci", model_claim=False)
    body = colocated("modelcar", {"uri": f"oci://{OCI_REFERENCE}"})
    body["spec"]["imagePullPolicy"] = "IfNotPresent"
    made["oci"] = S.Isvc.create(custom, ns, body)
    return made


def _texts(isvc: S.Isvc) -> dict[str, str]:
    isvc.wait_ready()
    sdk = S.openai_client(S.service_url(isvc.namespace, isvc.name))
    S.wait_serving(sdk, "smollm2")
    return {p: S.complete(sdk, "smollm2", p) for p in S.PROMPTS[:2]}


def test_gated_hub_model_with_token_downloads_once_into_the_shared_cache(
    sources, core, hub_route: HubRoute, cache_dir: Path, offline
) -> None:
    isvc = sources["hf"]
    assert _texts(isvc) == {p: offline.text(p) for p in S.PROMPTS[:2]}
    pods = [p for p in S.engine_pods(core, isvc.namespace, isvc.name, "decode") if S.pod_ready(p)]
    assert len(pods) == 2
    # Two pods, one download: the second waited on the cache folder's lock and found it done.
    repo = hub_route.hub.repos[GATED_REPO]
    fetched = {name: n for (rid, name), n in hub_route.hub.downloads.items() if rid == GATED_REPO}
    assert fetched == {name: 1 for name in repo.files}, fetched
    # With the token (the emulator serves the gated files to no other), which reached the
    # download step alone, never the engine (checked below).
    auth = {a for m, path, a in hub_route.hub.requests if f"{GATED_REPO}/resolve/" in path}
    assert f"Bearer {GATED_TOKEN}" in auth
    folder = cache_dir / "hf" / GATED_REPO / repo.commit
    assert (folder / "model.safetensors").stat().st_size == repo.files[
        "model.safetensors"
    ].stat().st_size
    assert (folder / ".splitserve-pull.json").is_file()
    for pod in pods:
        # The engine started only after its download step had finished.
        (init,) = pod.status.init_container_statuses
        assert init.name == "model-download" and init.state.terminated.exit_code == 0
        engine = pod.status.container_statuses[0]
        assert engine.state.running.started_at >= init.state.terminated.finished_at
        env = {e.name for e in pod.spec.containers[0].env or []}
        assert not pod.spec.containers[0].env_from and "HF_TOKEN" not in env


def test_download_failure_is_reported_and_nothing_starts(sources, core, custom) -> None:
    isvc = sources["denied"]

    def degraded() -> dict | None:
        cond = isvc.condition("Degraded")
        return cond if cond.get("reason") == "ModelDownloadFailed" else None

    cond = wait_until("Degraded=True, reason ModelDownloadFailed", degraded, timeout=300)
    assert cond["status"] == "True"
    assert f"hf://{GATED_REPO} is gated and no token is given" in cond["message"]
    assert "spec.model.credentials" in cond["message"]
    assert isvc.condition("Ready")["status"] == "False"
    (pod,) = S.engine_pods(core, isvc.namespace, isvc.name, "decode")
    assert pod.status.container_statuses[0].state.waiting is not None  # the engine never ran
    events = core.list_namespaced_event(isvc.namespace).items
    assert any(
        e.reason == "ModelDownloadFailed" and e.type == "Warning" and "is gated" in e.message
        for e in events
    ), [(e.reason, e.message) for e in events]


def test_s3_model_serves(sources, offline) -> None:
    assert _texts(sources["s3"]) == {p: offline.text(p) for p in S.PROMPTS[:2]}


def test_oci_model_image_is_mounted_as_an_image_volume(sources, core, offline, oci_image) -> None:
    isvc = sources["oci"]
    assert _texts(isvc) == {p: offline.text(p) for p in S.PROMPTS[:2]}
    (pod,) = [p for p in S.engine_pods(core, isvc.namespace, isvc.name, "decode") if S.pod_ready(p)]
    (volume,) = [v for v in pod.spec.volumes if v.name == "model"]
    assert volume.image.reference == OCI_REFERENCE  # the API server kept the image volume
    args = pod.spec.containers[0].args
    assert args[args.index("--model") + 1] == "/models/image/models"


def test_missing_oci_image_is_an_image_pull_failure(namespaces: S.Namespaces, custom) -> None:
    ns = namespaces.create("oci-missing", model_claim=False)
    body = colocated("nosuch", {"uri": "oci://registry.splitserve.test/models/none:1"})
    body["spec"]["router"]["nodeSelector"] = {S.NO_NODE_LABEL: "true"}
    isvc = S.Isvc.create(custom, ns, body)

    def degraded() -> dict | None:
        cond = isvc.condition("Degraded")
        return cond if cond.get("status") == "True" else None

    cond = wait_until("Degraded=True for the missing image", degraded, timeout=240)
    assert cond["reason"] == "PodsFailing" and "ErrImagePull" in cond["message"], cond
