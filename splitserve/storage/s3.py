"""Weights from S3 or an S3-compatible store (MinIO, Ceph RGW, GCS's XML API, R2...).

boto3 reads everything from the environment the download step is given: the credentials
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, or a workload
identity), the region and ``AWS_ENDPOINT_URL`` for a store other than AWS. Objects under the
prefix become files under the destination, their paths relative to the prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from splitserve.storage.progress import Progress


@dataclass(frozen=True)
class S3Object:
    key: str
    name: str  # the path below the prefix
    size: int
    etag: str


def split_uri(location: str) -> tuple[str, str]:
    """``bucket/some/prefix`` -> (bucket, ``some/prefix/``), or an empty prefix."""
    bucket, _, prefix = location.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def client():
    import boto3
    from botocore.config import Config

    # Path-style addressing: S3-compatible stores rarely have a DNS name per bucket.
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5})
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A session of its own: boto3's default session caches the credentials it first found.
    return boto3.session.Session().client("s3", config=config, region_name=region)


def listing(s3, bucket: str, prefix: str) -> list[S3Object]:
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if name and not name.endswith("/"):
                etag = obj.get("ETag", "").strip('"')
                objects.append(S3Object(obj["Key"], name, int(obj["Size"]), etag))
    return sorted(objects, key=lambda o: o.name)


def fetch(s3, bucket: str, objects: list[S3Object], dest: Path, complete: dict[str, str]) -> None:
    """Download ``objects``; those the marker lists with the same ETag and size are kept."""
    progress = Progress(len(objects), sum(o.size for o in objects))
    for obj in objects:
        path = dest / obj.name
        if (
            complete.get(obj.name) == obj.etag
            and path.is_file()
            and path.stat().st_size == obj.size
        ):
            progress.file_done(obj.name, obj.size, fetched=False)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        s3.download_file(bucket, obj.key, str(partial))
        partial.replace(path)
        progress.file_done(obj.name, obj.size, fetched=True)
