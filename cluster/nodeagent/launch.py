"""The container launcher: what runc and its shim do, for one container, as one small process.

The agent runs this file as a script (`python -I -S launch.py SPEC.json`, stdlib only, as root)
with the status pipe's write end inherited. Two modes:

`run`: the launcher (the "shim") unshares a PID namespace and forks the container's init, then
stays as its parent: it reports `pid <host pid>` on the status pipe, forwards SIGTERM & co. to the
init and exits with its status (128+signal when killed). The init, PID 1 of its namespace:
  1. joins the pod's network namespace (unless hostNetwork) and unshares mount and UTS namespaces;
  2. builds a root filesystem: an overlay whose lower layer is the host's `/` and whose upper layer
     is a private tmpfs (so mount points and writes never touch the host), with host-only folders
     made opaque (empty), a fresh /proc, /sys and /dev/shm, the image's folders, /etc/hosts, and
     each volume bind-mounted at its mountPath (read-only where asked);
  3. pivots into it, remounts it read-only for readOnlyRootFilesystem, sets the hostname,
     switches to the container's uid/gid/groups and working directory, and execs the command.
Any failure before exec is written as `error <message>` to the status pipe (the agent reports
it like a runtime's StartError); a successful exec closes the pipe (close-on-exec).

`exec`: runs a command inside a running container (exec probes, preStop hooks): it enters the
init's network, UTS, PID and mount namespaces, forks, and execs as the container's user.

Both set PR_SET_PDEATHSIG, so nothing outlives the agent: the agent's death kills the shim, the
shim's kills the init, and the init's death tears down its whole PID namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import signal
import sys
import warnings  # noqa: F401 - os.execvpe imports it lazily, after the switch to the user

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MS_PRIVATE, MS_SLAVE = 1 << 18, 1 << 19
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data) or None)
    _check(ret, f"mount {source or fstype} on {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def pdeathsig(sig: int = signal.SIGKILL) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def in_root(root: str, path: str) -> str:
    """`path` inside `root`, following symlinks as if `root` were `/` (never escaping it)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks under {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _make_mountpoint(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass


def build_root(spec: dict) -> str:
    """Mount the container's root filesystem under the scratch folder; returns its path."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    scratch = spec["scratch"]
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['scratch_size']},mode=755")
    upper, work, root = (os.path.join(scratch, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.mkdir(d)
    hidden: list[str] = []
    for folder in sorted(spec["opaque"], key=len):
        # An opaque upper folder hides the host's content: the image has its own (empty) one.
        if any(folder.startswith(h.rstrip("/") + "/") for h in hidden):
            continue  # already hidden by an opaque parent
        hidden.append(folder)
        path = upper + folder
        os.makedirs(path, exist_ok=True)
        st = os.stat(folder) if os.path.isdir(folder) else None
        os.chmod(path, 0o1777 if folder == "/tmp" else (st.st_mode & 0o7777 if st else 0o755))
        os.setxattr(path, "trusted.overlay.opaque", b"y")
    mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={upper},workdir={work}")
    mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
    mount(
        "tmpfs",
        root + "/dev/shm",
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={spec['shm_size']},mode=1777",
    )
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path, uid, gid, mode in spec["dirs"]:
        target = in_root(root, path)
        if not os.path.isdir(target):
            os.makedirs(target, exist_ok=True)
            os.chown(target, uid, gid)
            os.chmod(target, mode)
    for path, content, mode in spec["files"]:
        target = in_root(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(content)
        os.chmod(target, mode)
    # Shallow paths first (a volume at /a/b goes on top of one at /a); stable for equal depths.
    for m in sorted(spec["mounts"], key=lambda m: m["target"].rstrip("/").count("/")):
        target = in_root(root, m["target"])
        _make_mountpoint(m["source"], target)
        mount(m["source"], target, None, MS_BIND | MS_REC)
        if m["readonly"]:
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    workdir = in_root(root, spec["workdir"])
    os.makedirs(workdir, exist_ok=True)
    return root


def pivot(root: str) -> None:
    """Make `root` the namespace's `/` and drop the host's (runc's pivot_root(".", ".") trick)."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    new = os.open(root, os.O_DIRECTORY | os.O_RDONLY)
    os.fchdir(new)
    number = SYS_PIVOT_ROOT[platform.machine()]
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    os.fchdir(old)
    mount(None, ".", None, MS_SLAVE | MS_REC)
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.close(old)
    os.close(new)
    os.chdir("/")


def become(spec: dict) -> None:
    """Switch to the container's user (PDEATHSIG is reset by credential changes: set it again)."""
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    pdeathsig()


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())


def container_init(spec: dict, status_fd: int) -> None:
    """PID 1 of the container: namespaces, root filesystem, user, then exec. Never returns."""
    try:
        pdeathsig()
        if spec["netns"]:
            setns(spec["netns"], CLONE_NEWNET)
        unshare(CLONE_NEWNS | (CLONE_NEWUTS if spec["hostname"] else 0))
        root = build_root(spec)
        pivot(root)
        if spec["readonly_root"]:
            mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        if spec["hostname"]:
            name = spec["hostname"].encode()
            _check(_libc.sethostname(name, len(name)), "sethostname")
        os.chdir(spec["workdir"])
        become(spec)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.set_inheritable(status_fd, False)
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except FileNotFoundError as exc:
        _report(status_fd, f"error exec: {spec['argv'][0]!r}: executable file not found ({exc})")
    except BaseException as exc:  # noqa: BLE001 - everything is reported, then exit
        _report(status_fd, f"error {type(exc).__name__}: {exc}")
    os._exit(128)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _wait_forwarding(child: int) -> int:
    """Wait for `child`, passing the usual termination signals on to it."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return _exit_code(status)
        except ChildProcessError:
            return 128 + signal.SIGKILL
        except InterruptedError:
            continue


def run(spec: dict, status_fd: int) -> int:
    pdeathsig()
    if os.getppid() != spec["agent_pid"]:
        return 128 + signal.SIGKILL  # the agent died before PDEATHSIG was armed
    unshare(CLONE_NEWPID)
    child = os.fork()
    if child == 0:
        container_init(spec, status_fd)
    _report(status_fd, f"pid {child}")
    os.close(status_fd)
    return _wait_forwarding(child)


def exec_in(spec: dict) -> int:
    """Run spec["argv"] inside the container whose init is spec["target_pid"]."""
    pdeathsig()
    pid = spec["target_pid"]
    kinds = [
        ("net", CLONE_NEWNET),
        ("uts", CLONE_NEWUTS),
        ("pid", CLONE_NEWPID),
        ("mnt", CLONE_NEWNS),
    ]
    fds = [
        (os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), kind)
        for name, kind in kinds
    ]
    for fd, kind in fds:  # all opened first: after the mount namespace, /proc is the container's
        _check(_libc.setns(fd, kind), f"setns {kind:#x}")
        os.close(fd)
    child = os.fork()
    if child == 0:
        try:
            try:
                os.chdir(spec["workdir"])
            except OSError:
                os.chdir("/")
            become(spec)
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as exc:  # noqa: BLE001
            print(f"exec {spec['argv'][0]!r} failed: {exc}", file=sys.stderr, flush=True)
        os._exit(126)
    return _wait_forwarding(child)


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec["mode"] == "exec":
        return exec_in(spec)
    return run(spec, spec["status_fd"])


if __name__ == "__main__":
    sys.exit(main())
