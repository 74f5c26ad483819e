"""The container launcher for real (root only): namespaces, root filesystem, user, signals."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.cluster.nodeagent.runtime import LaunchSpec, Runtime, Spawner, StartError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the launcher needs root (namespaces)")

PYTHON = "/usr/bin/python3"  # readable by any user, as the image's interpreter is


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    spawner = Spawner()
    yield Runtime(spawner, tmp_path_factory.mktemp("exec"))
    spawner.stop()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"sstest-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
    yield f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "delete", name], timeout=10)


def spec(tmp: Path, netns: str | None, script: str, **kw: object) -> LaunchSpec:
    (tmp / "out").mkdir(mode=0o777, exist_ok=True)
    os.chmod(tmp / "out", 0o777)
    (tmp / "ro").mkdir(exist_ok=True)
    (tmp / "ro" / "f").write_text("hello")
    base = {
        "argv": [PYTHON, "-c", script],
        "env": {"PATH": "/usr/bin:/bin", "HOME": "/home/splitserve", "PYTHONUNBUFFERED": "1"},
        "workdir": "/home/splitserve",
        "uid": 10001,
        "gid": 10001,
        "groups": [10001],
        "netns": netns,
        "hostname": "pod-x",
        "scratch": str(tmp / "rootfs"),
        "readonly_root": True,
        "mounts": [
            {"source": str(tmp / "ro"), "target": "/models/m", "readonly": True},
            {"source": str(tmp / "out"), "target": "/out", "readonly": False},
        ],
        "dirs": [("/home/splitserve", 10001, 10001, 0o755)],
        "opaque": ["/tmp", "/run", str(tmp / "secret-state")],
        "files": [("/etc/hosts", "127.0.0.1 localhost\n", 0o644)],
    }
    return LaunchSpec(**(base | kw))  # type: ignore[arg-type]


INSPECT = """
import json, os, socket
facts = {
    "ids": [os.getuid(), os.getgid()], "cwd": os.getcwd(), "host": socket.gethostname(),
    "pid": os.getpid(), "model": open("/models/m/f").read(), "tmp": os.listdir("/tmp"),
    "links": sorted(os.listdir("/sys/class/net")),
}
for path in ("/", "/models/m/f"):
    try:
        open(path.rstrip("/") + "/w" if path == "/" else path, "a")
        facts[path] = "writable"
    except OSError as exc:
        facts[path] = exc.strerror
open("/out/facts.json", "w").write(json.dumps(facts))
"""


def test_container_sees_its_own_root_user_and_namespaces(
    runtime: Runtime, netns: str, tmp_path: Path
) -> None:
    import json

    (tmp_path / "secret-state").mkdir()
    proc = runtime.start(spec(tmp_path, netns, INSPECT), tmp_path / "c", tmp_path / "c.log")
    assert proc.wait(30) == 0, (tmp_path / "c.log").read_text()
    facts = json.loads((tmp_path / "out" / "facts.json").read_text())
    assert facts["ids"] == [10001, 10001] and facts["cwd"] == "/home/splitserve"
    assert facts["host"] == "pod-x" and facts["pid"] == 1  # PID 1 of its own namespace
    assert facts["model"] == "hello" and facts["tmp"] == []  # /tmp is the image's: empty
    assert facts["links"] == ["lo"]  # the pod's network namespace, not the host's
    assert facts["/"] == "Read-only file system"
    assert facts["/models/m/f"] in ("Read-only file system", "Permission denied")
    assert (
        not Path("/home/splitserve").exists() and not Path("/models/m").exists()
    )  # host untouched


def test_exec_in_the_container_and_signals(runtime: Runtime, netns: str, tmp_path: Path) -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        "open('/out/up', 'w').close()\n"
        "time.sleep(60)\n"
    )
    proc = runtime.start(spec(tmp_path, netns, script), tmp_path / "c", tmp_path / "c.log")
    deadline = time.monotonic() + 20
    while not (tmp_path / "out" / "up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    code, output = runtime.exec_in(proc, ["sh", "-c", "id -u; hostname; cat /models/m/f"], 10)
    assert code == 0 and output.split() == ["10001", "pod-x", "hello"]
    assert runtime.exec_in(proc, ["sh", "-c", "exit 3"], 10)[0] == 3
    assert runtime.exec_in(proc, ["sleep", "30"], 1)[0] is None  # timed out, killed
    proc.terminate()  # forwarded by the shim to the init, which handles it
    assert proc.wait(10) == 7


def test_sigkill_reads_as_137_and_pid_namespace_dies(
    runtime: Runtime, netns: str, tmp_path: Path
) -> None:
    script = "import subprocess, time; subprocess.Popen(['sleep', '313.37']); time.sleep(300)"
    proc = runtime.start(spec(tmp_path, netns, script), tmp_path / "c", tmp_path / "c.log")
    time.sleep(0.5)
    os.kill(proc.init_pid, 9)  # killed from outside, as a test or the OOM killer would
    assert proc.wait(10) == 137
    ps = subprocess.run(["pgrep", "-f", "sleep 313.37"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # the init's death took its children with it


def test_sigterm_is_ignored_by_a_pid_1_without_handler(
    runtime: Runtime, netns: str, tmp_path: Path
) -> None:
    proc = runtime.start(
        spec(tmp_path, netns, "import time; time.sleep(60)"), tmp_path / "c", tmp_path / "c.log"
    )
    proc.terminate()
    assert proc.wait(1.5) is None  # as in any container: PID 1 has no default SIGTERM action
    proc.kill()
    assert proc.wait(10) == 137


def test_missing_executable_is_a_start_error(runtime: Runtime, tmp_path: Path) -> None:
    bad = spec(tmp_path, None, "", argv=["no-such-program"], hostname=None)
    with pytest.raises(StartError, match="executable file not found"):
        runtime.start(bad, tmp_path / "c", tmp_path / "c.log")
