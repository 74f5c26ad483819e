"""OCI images on the local cluster's node, for Kubernetes image volumes (`volumes[].image`).

No registry or container runtime runs here, so images reach the node the way `kind load
image-archive` or `ctr images import` bring them: an OCI image layout (a folder with
`oci-layout`, `index.json` and `blobs/sha256/...`, or a tar of one, as `docker save`/`buildah
push oci-archive:` write) is loaded into the node's store, its layers unpacked in order (OCI
whiteouts applied) into one read-only root filesystem per manifest digest. The node agent mounts
that filesystem for an image volume whose reference was loaded; any other reference fails as an
image pull would (`ErrImagePull`), since nothing is ever pulled.

`build-model` writes such a layout for a model folder the way a KServe ModelCar image holds it
(the files under `/models`, one layer), without docker:

    python -P -m splitserve.cluster.ociimages build-model MODEL_DIR --tag REGISTRY/REPO:TAG
    python -P -m splitserve.cluster.ociimages load LAYOUT_DIR_OR_TAR --tag REGISTRY/REPO:TAG
    python -P -m splitserve.cluster.ociimages list
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from splitserve.cluster import image

# The node agent's store: `<--image-dir>/oci`, beside the image venv (same default folder).
STORE = image.REPO / image.IMAGE_DIR / "oci"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageUnavailable(LookupError):
    """The reference is not in the node's store (a real node would try to pull it)."""


def normalize(reference: str) -> str:
    """``repo`` -> ``docker.io/library/repo:latest``; a tag or digest is kept as given."""
    name, digest = (reference.split("@", 1) + [""])[:2]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not digest:
        name += ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name or ("." not in first and ":" not in first and first != "localhost"):
        name = "docker.io/" + (name if "/" in name else f"library/{name}")
    return f"{name}@{digest}" if digest else name


# ---- writing a layout ---------------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_model_layout(model_dir: Path, layout: Path, reference: str) -> str:
    """An OCI image layout holding ``model_dir``'s files under /models; returns its digest."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("models")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for path in sorted(model_dir.rglob("*")):
            if path.name.startswith("."):
                continue
            info = tar.gettarinfo(str(path), f"models/{path.relative_to(model_dir).as_posix()}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0  # reproducible: the same files make the same digest
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    # Level 1: weights hardly compress, and level 9 costs minutes on a 1 GB model.
    layer = _blob(layout, gzip.compress(raw.getvalue(), compresslevel=1, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_ref = _blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, **config_ref},
        "layers": [{"mediaType": LAYER_TYPE, **layer}],
    }
    manifest_ref = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                **manifest_ref,
                "annotations": {"org.opencontainers.image.ref.name": reference},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return manifest_ref["digest"]


# ---- the node's store ---------------------------------------------------------------------


class Store:
    """References -> manifest digests (refs.json) and one unpacked root filesystem per digest."""

    def __init__(self, root: Path = STORE) -> None:
        self.root = root

    def _refs(self) -> dict[str, str]:
        try:
            return json.loads((self.root / "refs.json").read_text())
        except (OSError, ValueError):
            return {}

    def rootfs(self, reference: str) -> Path:
        """The unpacked filesystem of ``reference``; raises ImageUnavailable."""
        ref = normalize(reference)
        refs = self._refs()
        digest = refs.get(ref)
        if digest is None and "@" in ref:
            wanted = ref.split("@", 1)[1]
            digest = wanted if wanted in refs.values() else None
        path = self.root / "rootfs" / (digest or "").replace(":", "-")
        if digest is None or not path.is_dir():
            raise ImageUnavailable(
                f"image {reference!r} is not on the node (nothing is pulled here: load it with "
                "`python -P -m splitserve.cluster.ociimages load`)"
            )
        return path

    def load(self, layout: Path, reference: str) -> str:
        """Unpack an OCI layout (folder or tar) and tag it; returns the manifest digest."""
        with tempfile.TemporaryDirectory() as tmp:
            if layout.is_file():
                with tarfile.open(layout) as tar:
                    tar.extractall(tmp, filter="data")
                layout = Path(tmp)
            index = json.loads((layout / "index.json").read_text())
            manifest_ref = index["manifests"][0]
            digest = manifest_ref["digest"]
            manifest = json.loads(_read_blob(layout, digest))
            target = self.root / "rootfs" / digest.replace(":", "-")
            if not target.is_dir():
                staging = self.root / "rootfs" / f".{digest.replace(':', '-')}.tmp"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                for layer in manifest["layers"]:
                    _apply_layer(_read_blob(layout, layer["digest"]), staging)
                staging.rename(target)
        refs = self._refs() | {normalize(reference): digest}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp_refs = self.root / ".refs.json.tmp"
        tmp_refs.write_text(json.dumps(refs, indent=1, sort_keys=True))
        tmp_refs.replace(self.root / "refs.json")
        return digest

    def references(self) -> dict[str, str]:
        return self._refs()


def _read_blob(layout: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":", 1)
    data = (layout / "blobs" / algorithm / hexdigest).read_bytes()
    if hashlib.new(algorithm, data).hexdigest() != hexdigest:
        raise ValueError(f"blob {digest} does not match its digest")
    return data


def _apply_layer(blob: bytes, root: Path) -> None:
    """Unpack one layer over ``root``: OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) first."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        members = []
        for member in tar.getmembers():
            parent, _, base = member.name.rpartition("/")
            if base == ".wh..wh..opq":
                folder = root / parent
                for child in folder.iterdir() if folder.is_dir() else ():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            elif base.startswith(".wh."):
                gone = root / parent / base[len(".wh.") :]
                if gone.is_dir() and not gone.is_symlink():
                    shutil.rmtree(gone)
                elif gone.exists() or gone.is_symlink():
                    gone.unlink()
            else:
                members.append(member)
        tar.extractall(root, members=members, filter="data")
    # Readable by every pod user, as an image's files are whatever uid the pod runs as.
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else (path.stat().st_mode | 0o444))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -P -m splitserve.cluster.ociimages")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build-model", help="a ModelCar-layout image of a model folder")
    build.add_argument("model_dir", type=Path)
    build.add_argument("--tag", required=True)
    build.add_argument("--out", type=Path, default=None, help="keep the OCI layout here")
    load = sub.add_parser("load", help="load an OCI layout (folder or tar) onto the node")
    load.add_argument("layout", type=Path)
    load.add_argument("--tag", required=True)
    sub.add_parser("list")
    for each in (build, load):
        each.add_argument("--store", type=Path, default=STORE)
    args = p.parse_args(argv)
    if args.action == "list":
        for ref, digest in sorted(Store().references().items()):
            print(f"{ref}\t{digest}")
        return 0
    store = Store(args.store)
    if args.action == "load":
        print(store.load(args.layout, args.tag))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        layout = args.out or Path(tmp)
        layout.mkdir(parents=True, exist_ok=True)
        build_model_layout(args.model_dir, layout, args.tag)
        print(store.load(layout, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
