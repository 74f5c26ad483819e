"""Volume payloads, kubelet's atomic-writer layout and the default service-account volume."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from splitserve.cluster.nodeagent import projection, volumes
from splitserve.cluster.nodeagent.objects import NotReady, Token
from splitserve.cluster.nodeagent.volumes import PodContext, PodVolumes


def test_config_map_items_modes_and_binary_data() -> None:
    obj = {"data": {"a": "1", "b": "2"}, "binaryData": {"bin": base64.b64encode(b"\0\1").decode()}}
    assert projection.config_map_payload(obj, {"name": "cm"}, 0o644) == {
        "a": (b"1", 0o644),
        "b": (b"2", 0o644),
        "bin": (b"\0\1", 0o644),
    }
    items = {"name": "cm", "items": [{"key": "b", "path": "dir/b.txt", "mode": 0o600}]}
    assert projection.config_map_payload(obj, items, 0o644) == {"dir/b.txt": (b"2", 0o600)}
    with pytest.raises(projection.MissingSource):
        projection.config_map_payload(None, {"name": "cm"}, 0o644)
    assert projection.config_map_payload(None, {"name": "cm", "optional": True}, 0o644) == {}


def test_atomic_writer_layout_and_updates(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    assert projection.write_atomic(target, {"token": (b"t1", 0o644), "ca.crt": (b"ca", 0o644)})
    assert (target / "..data").is_symlink() and os.readlink(target / "token") == "..data/token"
    first = (target / "..data").resolve()
    assert (target / "token").read_bytes() == b"t1"
    assert not projection.write_atomic(target, {"token": (b"t1", 0o644), "ca.crt": (b"ca", 0o644)})
    assert projection.write_atomic(target, {"token": (b"t2", 0o644)})
    assert (target / "token").read_bytes() == b"t2"
    assert not (target / "ca.crt").exists() and not first.exists()  # old files and folder gone
    assert oct((target / "token").stat().st_mode & 0o777) == "0o644"


def test_default_token_volume_added_unless_opted_out_or_present() -> None:
    pod: dict[str, Any] = {"spec": {"containers": [{"name": "c"}]}}
    vols, added = volumes.with_default_token_volume(pod)
    assert added and vols[0]["name"] == volumes.SA_VOLUME
    pod["spec"]["automountServiceAccountToken"] = False
    assert volumes.with_default_token_volume(pod) == ([], False)
    mounted = {
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "volumeMounts": [
                        {"name": "kube-api-access-x", "mountPath": volumes.SA_MOUNT_PATH}
                    ],
                }
            ],
            "volumes": [{"name": "kube-api-access-x", "projected": {"sources": []}}],
        }
    }
    assert volumes.with_default_token_volume(mounted)[1] is False


class FakeObjects:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bound = False

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"data": {"ca.crt": "CA"}} if name == "kube-root-ca.crt" else None

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"data": {"k": base64.b64encode(b"v").decode()}}

    def claim_host_path(self, namespace: str, claim: str) -> str:
        if not self.bound:
            raise NotReady("not bound")
        return str(self.tmp / "pv")


class FakeTokens:
    def token(self, pod: dict[str, Any], audience: str | None, expiration_s: int) -> Token:
        return Token(f"token-for-{audience or 'api'}-{expiration_s}", 0.0, 3600.0)

    def forget(self, uid: str) -> None:
        pass


def test_pod_volumes_and_container_mounts(tmp_path: Path) -> None:
    (tmp_path / "pv").mkdir()
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "volumeMounts": [
                        {"name": "model", "mountPath": "/models/m", "readOnly": False},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "sec", "mountPath": "/etc/sec"},
                        {"name": "tmp", "mountPath": "/data/sub", "subPathExpr": "$(POD)"},
                    ],
                }
            ],
            "volumes": [
                {"name": "model", "persistentVolumeClaim": {"claimName": "m", "readOnly": True}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "sec", "secret": {"secretName": "s"}},
            ],
        },
    }
    objects = FakeObjects(tmp_path)
    vols = PodVolumes(pod, tmp_path / "pod", objects, FakeTokens(), PodContext("h", "p", {}))  # type: ignore[arg-type]
    with pytest.raises(NotReady):
        vols.setup()  # the claim is not bound yet: retried later
    objects.bound = True
    vols.setup()
    mounts = {m["target"]: m for m in vols.mounts(pod["spec"]["containers"][0], {"POD": "p"})}
    assert mounts["/models/m"] == {
        "source": str(tmp_path / "pv"),
        "target": "/models/m",
        "readonly": True,
    }  # the claim's readOnly wins
    assert mounts["/tmp"]["readonly"] is False
    assert mounts["/etc/sec"]["readonly"] is True  # secrets are always read-only
    assert mounts["/data/sub"]["source"].endswith("volumes/tmp/p")
    token_dir = tmp_path / "pod" / "volumes" / volumes.SA_VOLUME
    assert (token_dir / "token").read_text() == "token-for-api-3607"
    assert (token_dir / "ca.crt").read_text() == "CA"
    assert (token_dir / "namespace").read_text() == "ns"
    assert mounts[volumes.SA_MOUNT_PATH]["readonly"] is True
    assert oct((tmp_path / "pod" / "volumes" / "tmp").stat().st_mode & 0o777) == "0o777"
    vols.teardown()
    assert not (tmp_path / "pod" / "volumes").exists() and (tmp_path / "pv").exists()


def test_unsupported_volume_type_is_an_error(tmp_path: Path) -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": {
            "containers": [{"name": "c"}],
            "automountServiceAccountToken": False,
            "volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}],
        },
    }
    vols = PodVolumes(pod, tmp_path, FakeObjects(tmp_path), FakeTokens(), PodContext("", "", {}))  # type: ignore[arg-type]
    with pytest.raises(volumes.VolumeError, match="unsupported volume type"):
        vols.setup()


def test_token_refresh_rule() -> None:
    t = Token("x", issued_at=0.0, expires_at=1000.0)
    assert not t.needs_refresh(799.0) and t.needs_refresh(801.0)


def test_image_volume_mounts_a_loaded_model_image_read_only(tmp_path: Path) -> None:
    """A ModelCar-layout image built without docker, loaded as `kind load` would, mounted."""
    from splitserve.cluster import ociimages

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "tok.json").write_text("[]")
    layout = tmp_path / "layout"
    digest = ociimages.build_model_layout(model, layout, "registry.example/models/m:1")
    again = ociimages.build_model_layout(model, tmp_path / "layout2", "registry.example/models/m:1")
    assert again == digest  # reproducible: the same files make the same image
    store = ociimages.Store(tmp_path / "store")
    assert store.load(layout, "registry.example/models/m:1") == digest
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "volumeMounts": [{"name": "m", "mountPath": "/mnt/m"}]}],
            "volumes": [{"name": "m", "image": {"reference": "registry.example/models/m:1"}}],
        },
    }
    ctx = PodContext("", "", {})
    vols = PodVolumes(pod, tmp_path / "pod", FakeObjects(tmp_path), FakeTokens(), ctx, store)  # type: ignore[arg-type]
    vols.setup()
    (mount,) = vols.mounts(pod["spec"]["containers"][0], {})
    assert mount["readonly"] is True and mount["target"] == "/mnt/m"
    root = Path(mount["source"])
    assert (root / "models" / "config.json").read_text() == "{}"
    assert (root / "models" / "sub" / "tok.json").read_text() == "[]"
    # By digest too; an image never loaded is a pull error (the pod waits in ErrImagePull).
    assert store.rootfs(f"registry.example/models/m@{digest}") == root
    missing = pod | {
        "spec": pod["spec"] | {"volumes": [{"name": "m", "image": {"reference": "x/y:2"}}]}
    }
    vols = PodVolumes(missing, tmp_path / "pod2", FakeObjects(tmp_path), FakeTokens(), ctx, store)  # type: ignore[arg-type]
    with pytest.raises(volumes.ImagePullError, match="not on the node"):
        vols.setup()


def test_image_references_normalize_as_docker_does() -> None:
    from splitserve.cluster.ociimages import normalize

    assert normalize("busybox") == "docker.io/library/busybox:latest"
    assert normalize("acme/m") == "docker.io/acme/m:latest"
    assert normalize("ghcr.io/acme/m") == "ghcr.io/acme/m:latest"
    assert normalize("localhost:5000/m:2") == "localhost:5000/m:2"
    assert normalize("ghcr.io/acme/m@sha256:ab") == "ghcr.io/acme/m@sha256:ab"
