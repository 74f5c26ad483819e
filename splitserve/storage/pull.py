"""`splitserve pull-model URI --dest DIR [--revision R]`: the download step of an engine pod.

Fetches ``hf://ORG/NAME`` (at a revision) or ``s3://BUCKET/PREFIX`` into DIR and exits 0 once
the folder is complete, so the engine container that follows never sees half a model. Made for
shared caches (a ReadWriteMany claim, a node folder):

- one download at a time per folder: other pods wait on a lock beside it, then find it done;
- a completion marker (``.splitserve-pull.json``: URI, commit, files) written last; a folder
  whose marker names the pinned commit is used without asking the hub (restarts work offline);
- files the source no longer has are removed, those it still has are not fetched again.

Progress is one log line per file. A failure is one line naming the cause and what to change in
the InferenceService (the last line of the output, which the operator's status reports), and
exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from splitserve.observability.logs import LOG_FORMATS, setup_logging

log = logging.getLogger("splitserve.storage")
MARKER = ".splitserve-pull.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_KEEP = {MARKER, ".cache"}  # the marker and the hub library's own bookkeeping folder


class PullError(Exception):
    """A download that cannot succeed as configured; the message says what to change."""


@dataclass(frozen=True)
class Pulled:
    uri: str
    commit: str  # the hub commit, or "" for object storage
    files: dict[str, str]  # name -> commit (hub) or ETag (S3)

    def marker(self) -> str:
        body = {"uri": self.uri, "commit": self.commit, "files": self.files}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="hf://ORG/NAME or s3://BUCKET/PREFIX")
    p.add_argument("--dest", required=True, help="folder to fill (created if missing)")
    p.add_argument("--revision", default="", help="hub commit, tag or branch (default: main)")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS)
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format, "model-download")
    for noisy in ("httpx", "httpx2", "botocore", "urllib3"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        pulled = pull(args.uri, Path(args.dest), args.revision)
    except PullError as exc:
        log.error("%s", exc)
        print(f"pull-model: error: {exc}", file=sys.stderr, flush=True)
        return 1
    detail = f" at commit {pulled.commit}" if pulled.commit else ""
    log.info(
        "%s%s complete in %s (%d files, %.1f s)",
        args.uri, detail, args.dest, len(pulled.files), time.monotonic() - started,
    )  # fmt: skip
    return 0


def pull(uri: str, dest: Path, revision: str = "") -> Pulled:
    """Make ``dest`` a complete copy of ``uri``; raises `PullError`."""
    scheme, sep, location = uri.partition("://")
    if not sep or scheme not in ("hf", "s3") or not location.strip("/"):
        raise PullError(f"{uri!r}: pull-model fetches hf://ORG/NAME or s3://BUCKET/PREFIX")
    location = location.strip("/")
    uri = f"{scheme}://{location}"  # one spelling in the marker, whatever slashes were given
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(
            f"cannot create {dest}: {exc} (the cache must be writable by the pod's user)"
        ) from exc
    with _locked(dest):
        previous = _read_marker(dest, uri)
        if scheme == "hf":
            pulled = _pull_hub(uri, location, revision, dest, previous)
        else:
            if revision:
                log.info(
                    "%s: object storage has no revisions; %r only names the version", uri, revision
                )
            pulled = _pull_s3(uri, location, dest, previous)
        _prune(dest, set(pulled.files))
        tmp = dest / f".{MARKER}.tmp"
        tmp.write_text(pulled.marker())
        tmp.replace(dest / MARKER)
        return pulled


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One download per folder across pods sharing the cache (flock on a file beside it)."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another pod is downloading into %s: waiting for it", dest)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(dest: Path, uri: str) -> Pulled | None:
    try:
        body = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if body.get("uri") != uri:
        return None
    return Pulled(uri, str(body.get("commit", "")), dict(body.get("files") or {}))


def _complete_files(dest: Path, pulled: Pulled | None) -> dict[str, str]:
    if pulled is None:
        return {}
    return {n: v for n, v in pulled.files.items() if (dest / n).is_file()}


def _pull_hub(uri: str, repo_id: str, revision: str, dest: Path, previous: Pulled | None) -> Pulled:
    from splitserve.storage import hub

    done = _complete_files(dest, previous)
    if (
        previous is not None
        and _COMMIT.match(revision)
        and previous.commit == revision
        and len(done) == len(previous.files)
    ):
        log.info("%s at commit %s is already complete in %s", uri, revision, dest)
        return previous
    log.info("resolving %s at %s from %s", uri, revision or "main", hub.endpoint())
    try:
        snapshot = hub.resolve(repo_id, revision)
        log.info("%s at %s is commit %s: %d files", uri, revision or "main", snapshot.commit,
                 len(snapshot.files))  # fmt: skip
        same_commit = {n for n, c in done.items() if c == snapshot.commit}
        hub.fetch(repo_id, snapshot, dest, same_commit)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line that says why
        raise PullError(_hub_error(uri, revision, exc)) from exc
    return Pulled(uri, snapshot.commit, {f.name: snapshot.commit for f in snapshot.files})


def _hub_error(uri: str, revision: str, exc: Exception) -> str:
    from huggingface_hub import errors

    from splitserve.storage import hub

    token = "a token is given" if os.environ.get("HF_TOKEN") else "no token is given"
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"{uri} is gated and {token}: put HF_TOKEN of an account granted access in the "
            "Secret named by spec.model.credentials.secretName"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{uri}: revision {revision!r} does not exist (spec.model.revision)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"{uri}: no such model at {hub.endpoint()}, or it is private and {token} with access "
            "(HF_TOKEN in the Secret of spec.model.credentials)"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"{uri}: the hub at {hub.endpoint()} answered HTTP {status}: {_one_line(exc)}"
    if isinstance(exc, OSError) and getattr(exc, "errno", None) is not None:
        return f"{uri}: cannot write the model files: {_one_line(exc)}"
    return f"{uri}: cannot download from {hub.endpoint()}: {type(exc).__name__}: {_one_line(exc)}"


def _pull_s3(uri: str, location: str, dest: Path, previous: Pulled | None) -> Pulled:
    from splitserve.storage import s3

    bucket, prefix = s3.split_uri(location)
    where = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    log.info("listing %s at %s", uri, where)
    try:
        client = s3.client()
        objects = s3.listing(client, bucket, prefix)
        if not objects:
            raise PullError(f"{uri}: no objects under that prefix at {where} (spec.model.uri)")
        log.info("%s: %d objects", uri, len(objects))
        s3.fetch(client, bucket, objects, dest, _complete_files(dest, previous))
    except PullError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line that says why
        raise PullError(_s3_error(uri, where, exc)) from exc
    return Pulled(uri, "", {o.name: o.etag for o in objects})


def _s3_error(uri: str, where: str, exc: Exception) -> str:
    from botocore import exceptions as bx

    secret = "the Secret of spec.model.credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    if isinstance(exc, bx.NoCredentialsError):
        return f"{uri}: no S3 credentials: give {secret} or a workload identity"
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"{uri}: {where} refused the credentials ({code}): check {secret}"
        if code == "NoSuchBucket":
            return (
                f"{uri}: the bucket does not exist at {where} (spec.model.uri, spec.model.endpoint)"
            )
        return f"{uri}: {where} answered {code or 'an error'}: {_one_line(exc)}"
    if isinstance(exc, bx.EndpointConnectionError):
        return f"{uri}: cannot reach {where} (spec.model.endpoint): {_one_line(exc)}"
    return f"{uri}: cannot download from {where}: {type(exc).__name__}: {_one_line(exc)}"


def _prune(dest: Path, keep: set[str]) -> None:
    """Remove files the source no longer has (a moved branch), never the bookkeeping."""
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest).as_posix()
        if rel.split("/", 1)[0] in _KEEP or rel.startswith(f".{MARKER}"):
            continue
        if path.is_file() and rel not in keep:
            path.unlink()
            log.info("removed %s (not in the source any more)", rel)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]
