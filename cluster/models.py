"""Model weights for the local cluster: the converted default model on a hostPath volume.

Pods load `pvc://CLAIM/PATH` models from a PersistentVolumeClaim mounted at `/models/CLAIM`. In
the local cluster the claim binds to a hostPath PersistentVolume whose folder holds the model
that `make install` (`splitserve fetch-model`) converted into `~/.cache/splitserve`. That cache
is private to root (mode 0700/0600), and pods run as uid 10001, as on any cluster where a volume's
files must be readable by the pod's user (kubelet changes no ownership on hostPath volumes, and
fsGroup does not apply to them). So the model is staged: copied once into
`.cache/cluster/models/<name>/` with world-readable modes, and copied again only when the source
changes (its completion marker, sizes or modification times).

    python -P -m splitserve.cluster.models stage      # prints the staged folder
    python -P -m splitserve.cluster.models manifest -n NAMESPACE [--claim llm-weights]
        # a PersistentVolume + PersistentVolumeClaim pair bound to it, as YAML
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
STAGE_DIR = REPO / ".cache" / "cluster" / "models"
MARKER = ".splitserve-complete"  # written by the engine's loader when a conversion finished
STAMP = ".staged-from"
DEFAULT_CLAIM = "llm-weights"


class ModelMissing(RuntimeError):
    """The converted default model is not there: run `make install` (or fetch-model)."""


def source_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the engine's loader keeps the converted model (``$SPLITSERVE_CACHE`` honoured)."""
    root = Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))
    return root / name


def _fingerprint(src: Path) -> str:
    files = sorted(p for p in src.iterdir() if p.is_file())
    return json.dumps(
        [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files], separators=(",", ":")
    )


def stage(name: str = DEFAULT_MODEL, dest_root: Path = STAGE_DIR) -> Path:
    """A world-readable copy of the converted model ``name``; returns its folder."""
    src = source_dir(name)
    if not (src / MARKER).is_file():
        raise ModelMissing(
            f"{src} holds no converted model: run `make install` or "
            "`.venv/bin/splitserve fetch-model`"
        )
    dest = dest_root / name
    fingerprint = _fingerprint(src)
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text() == fingerprint:
        return dest
    tmp = dest_root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copyfile(path, tmp / path.name)
            os.chmod(tmp / path.name, 0o644)
    (tmp / STAMP).write_text(fingerprint)
    os.chmod(tmp, 0o755)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def volume_manifests(
    namespace: str,
    host_path: Path,
    claim: str = DEFAULT_CLAIM,
    pv_name: str | None = None,
    access_mode: str = "ReadOnlyMany",
) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume pre-bound to a claim in ``namespace`` (read-only unless
    ``access_mode`` says otherwise, e.g. ReadWriteMany for a shared download cache).

    The PV names its claim (claimRef) and the claim its volume (volumeName), with no storage
    class, so the real PV controller binds exactly this pair and no provisioner is involved.
    """
    pv = pv_name or f"{namespace}-{claim}"
    size = "1Gi"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv, "labels": {"splitserve.io/model-volume": claim}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": [access_mode],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim},
                "hostPath": {"path": str(host_path), "type": "Directory"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": [access_mode],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -P -m splitserve.cluster.models")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="copy the converted default model where pods can read it")
    s.add_argument("--name", default=DEFAULT_MODEL)
    m = sub.add_parser("manifest", help="print a PV + PVC holding the staged model (YAML)")
    m.add_argument("-n", "--namespace", required=True)
    m.add_argument("--claim", default=DEFAULT_CLAIM)
    m.add_argument("--name", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    try:
        folder = stage(args.name)
    except ModelMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "stage":
        print(folder)
        return 0
    import yaml

    # The PV's folder is the staged models folder: the claim's path part names the model.
    docs = volume_manifests(args.namespace, folder.parent, args.claim)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
