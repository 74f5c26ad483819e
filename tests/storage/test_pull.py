"""`splitserve pull-model`: real huggingface_hub / boto3 clients against a hub emulator and an
S3-compatible server (moto), through the real command line where the exit status matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_emulator import HubEmulator

from splitserve.storage.pull import MARKER, PullError, pull

REPO_ID = "acme/tiny-model"
TOKEN = "hf_test_token"


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "pytorch_model.bin").write_bytes(b"redundant copy")  # skipped: safetensors exist
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def hub(monkeypatch) -> HubEmulator:
    emulator = HubEmulator().start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield emulator
    emulator.stop()


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.relative_to(folder).as_posix().startswith((".", MARKER))
    }


def test_hub_model_is_fetched_complete_and_pinned(hub, model_folder, tmp_path) -> None:
    repo = hub.add_repo(REPO_ID, model_folder)
    dest = tmp_path / "cache" / "hf" / REPO_ID / "main"
    pulled = pull(f"hf://{REPO_ID}", dest)
    assert pulled.commit == repo.commit
    expected = {k: v for k, v in _files(model_folder).items() if k != "pytorch_model.bin"}
    assert _files(dest) == expected
    marker = json.loads((dest / MARKER).read_text())
    assert marker["commit"] == repo.commit and set(marker["files"]) == set(expected)
    assert sum(hub.downloads.values()) == len(expected)

    # Pinned to the commit it has: the hub is not asked at all (restarts work offline).
    hub.requests.clear()
    again = pull(f"hf://{REPO_ID}", dest, revision=repo.commit)
    assert again.commit == repo.commit and hub.requests == []
    # A branch is resolved again, but no file of the same commit is fetched again.
    pull(f"hf://{REPO_ID}", dest, revision="main")
    assert sum(hub.downloads.values()) == len(expected)
    assert [m for m, *_ in hub.requests] == ["GET"]  # the listing only


def test_files_the_source_dropped_are_removed(hub, model_folder, tmp_path) -> None:
    hub.add_repo(REPO_ID, model_folder)
    dest = tmp_path / "dest"
    pull(f"hf://{REPO_ID}", dest)
    (model_folder / "sub" / "tokenizer.json").unlink()
    hub.add_repo(REPO_ID, model_folder)  # a new commit without it
    pull(f"hf://{REPO_ID}", dest)
    assert not (dest / "sub" / "tokenizer.json").exists()
    assert (dest / "model.safetensors").exists()


def test_gated_model_needs_the_token(hub, model_folder, tmp_path, monkeypatch) -> None:
    hub.add_repo(REPO_ID, model_folder, token=TOKEN)
    dest = tmp_path / "dest"
    with pytest.raises(PullError) as info:
        pull(f"hf://{REPO_ID}", dest)
    assert "is gated and no token is given" in str(info.value)
    assert "spec.model.credentials" in str(info.value)
    assert not (dest / MARKER).exists()
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PullError, match="is gated and a token is given"):
        pull(f"hf://{REPO_ID}", dest)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pull(f"hf://{REPO_ID}", dest)
    assert (dest / MARKER).exists()
    assert {auth for m, p, auth in hub.requests if "/resolve/" in p} >= {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("uri", "revision", "says"),
    [
        ("hf://acme/missing", "", "no such model"),
        (f"hf://{REPO_ID}", "v9", "revision 'v9' does not exist"),
        ("gs://bucket/x", "", "pull-model fetches hf://"),
    ],
)
def test_failures_name_the_cause(hub, model_folder, tmp_path, uri, revision, says) -> None:
    hub.add_repo(REPO_ID, model_folder)
    with pytest.raises(PullError, match=says):
        pull(uri, tmp_path / "dest", revision)


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on discard
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(PullError, match="cannot download from http://127.0.0.1:9"):
        pull(f"hf://{REPO_ID}", tmp_path / "dest")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("splitserve")
    return subprocess.run(
        [str(exe), "pull-model", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_command_line_exit_status_and_last_line(hub, model_folder, tmp_path) -> None:
    hub.add_repo(REPO_ID, model_folder, token=TOKEN)
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    env.pop("HF_TOKEN", None)
    dest = tmp_path / "dest"
    failed = _cli(f"hf://{REPO_ID}", "--dest", str(dest), env=env)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("pull-model: error: hf://acme/tiny-model is gated"), failed.stderr
    done = _cli(f"hf://{REPO_ID}", "--dest", str(dest), env=env | {"HF_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "fetched model.safetensors" in out and "[3/3 files" in out  # progress per file
    assert "complete in" in out


def test_concurrent_pulls_into_one_folder_download_once(hub, model_folder, tmp_path) -> None:
    """Pods sharing a cache claim: the second waits on the lock, then finds the folder done."""
    hub.add_repo(REPO_ID, model_folder)
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    dest = tmp_path / "shared" / "main"
    exe = Path(sys.executable).with_name("splitserve")
    procs = [
        subprocess.Popen(
            [str(exe), "pull-model", f"hf://{REPO_ID}", "--dest", str(dest)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert max(hub.downloads.values()) == 1, hub.downloads


# ---- s3:// against moto's S3-compatible server ----------------------------------------------


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield f"http://{host}:{port}"
    server.stop()


def _upload(folder: Path, bucket: str, prefix: str) -> None:
    from splitserve.storage import s3

    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_s3_prefix_is_fetched_and_reused(s3_server, model_folder, tmp_path) -> None:
    _upload(model_folder, "models", "tiny/v1")
    dest = tmp_path / "cache" / "s3"
    pulled = pull("s3://models/tiny/v1", dest)
    assert _files(dest) == _files(model_folder)  # every object, the .bin included
    assert set(pulled.files) == set(_files(model_folder))
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    pull("s3://models/tiny/v1/", dest)  # same ETags: nothing fetched again
    after = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != MARKER} == {
        p: t for p, t in before.items() if p.name != MARKER
    }


@pytest.mark.parametrize(
    ("uri", "env", "says"),
    [
        ("s3://nobucket/x", {}, "the bucket does not exist"),
        ("s3://models/empty", {}, "no objects under that prefix"),
        ("s3://models/tiny", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
         "no S3 credentials"),
    ],
)  # fmt: skip
def test_s3_failures_name_the_cause(
    s3_server, model_folder, tmp_path, monkeypatch, uri, env, says
) -> None:
    _upload(model_folder, "models", "tiny")
    for key, value in env.items():
        monkeypatch.delenv(key) if value is None else monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PullError, match=says):
        pull(uri, tmp_path / "dest")
