"""What one container is started with: env, argv, user, root filesystem plan, mounts.

Pure assembly from the pod spec, the image's config and the pod's sandbox; the only API reads are
the referenced ConfigMaps/Secrets and the Services behind the service-link variables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.cluster import image as image_mod
from splitserve.cluster import ociimages
from splitserve.cluster.nodeagent import envvars
from splitserve.cluster.nodeagent.command import container_argv
from splitserve.cluster.nodeagent.config import AgentConfig
from splitserve.cluster.nodeagent.ipam import IPAllocator
from splitserve.cluster.nodeagent.kube import Kube
from splitserve.cluster.nodeagent.objects import ApiObjects, TokenIssuer
from splitserve.cluster.nodeagent.runtime import LaunchSpec, Runtime
from splitserve.cluster.nodeagent.statuswriter import StatusWriter
from splitserve.cluster.nodeagent.volumes import PodVolumes


@dataclass(frozen=True)
class NodeServices:
    """What every pod worker shares (built once by the agent)."""

    config: AgentConfig
    kube: Kube
    objects: ApiObjects
    tokens: TokenIssuer
    runtime: Runtime
    ipam: IPAllocator
    writer: StatusWriter
    image: image_mod.ImageConfig
    allocatable: Callable[[], dict[str, str]]
    host_hostname: str

    @property
    def images(self) -> ociimages.Store:
        """OCI images loaded onto the node (image volumes): `<image_dir>/oci`."""
        return ociimages.Store(self.config.image_dir / "oci")

    def current_image(self) -> image_mod.ImageConfig:
        """The image as built now: a container started after `image build` refreshed it runs
        the new one (as after a re-pull), the ones already running keep theirs (a new
        dependency set gets a new venv folder; the previous one is kept)."""
        try:
            img = image_mod.load(self.config.image_dir)
        except (OSError, ValueError, TypeError):
            return self.image
        return img if Path(img.venv).is_dir() else self.image


@dataclass(frozen=True)
class Sandbox:
    """The pod-level facts a container is started into."""

    pod: dict[str, Any]
    pod_ip: str
    netns: str | None  # None: hostNetwork
    hostname: str | None  # the host's name for hostNetwork pods, else None (the pod's)
    volumes: PodVolumes
    scratch: Path


def identity(
    pod: dict[str, Any], container: dict[str, Any], image: image_mod.ImageConfig
) -> tuple[int, int, list[int]]:
    """uid, gid and groups: container securityContext over the pod's over the image's USER."""
    psc = pod["spec"].get("securityContext") or {}
    csc = container.get("securityContext") or {}
    img_uid, img_gid = image.uid_gid
    uid = int(csc.get("runAsUser", psc.get("runAsUser", img_uid)))
    gid = int(csc.get("runAsGroup", psc.get("runAsGroup", img_gid if uid == img_uid else 0)))
    if uid == 0 and csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        raise envvars.ConfigError("container has runAsNonRoot and image will run as root")
    groups = [gid, *psc.get("supplementalGroups", [])]
    if psc.get("fsGroup") is not None:
        groups.append(int(psc["fsGroup"]))
    return uid, gid, sorted(set(groups))


def image_account_files(
    img: image_mod.ImageConfig, etc: Path = Path("/etc")
) -> list[tuple[str, str, int]]:
    """/etc/passwd and /etc/group with the image's user, as the Dockerfile's `useradd` made it.

    The root filesystem is the host's, whose account files lack the image's user: without its
    entry `getpass.getuser()` and `~` expansion fail for uid 10001 (kopf names its peer identity
    after the user). The name is HOME's last part (the Dockerfile's `useradd --home-dir`).
    """
    uid, gid = img.uid_gid
    home = img.env.get("HOME", "/")
    name = Path(home).name or f"user{uid}"
    out: list[tuple[str, str, int]] = []
    for file, entry, key in (
        ("passwd", f"{name}:x:{uid}:{gid}::{home}:/bin/sh", uid),
        ("group", f"{name}:x:{gid}:", gid),
    ):
        try:
            text = (etc / file).read_text()
        except OSError:
            text = ""
        if any(line.split(":")[2:3] == [str(key)] for line in text.splitlines()):
            continue
        if text and not text.endswith("\n"):
            text += "\n"
        out.append((f"/etc/{file}", f"{text}{entry}\n", 0o644))
    return out


def pod_hostname(pod: dict[str, Any]) -> str:
    return (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


def service_env(node: NodeServices, pod: dict[str, Any]) -> dict[str, str]:
    """KUBERNETES_SERVICE_* always; the namespace's Services too unless enableServiceLinks=false."""
    cluster_ip = None
    master = node.objects.service("default", "kubernetes")
    if master is not None:
        address = envvars.service_address(master)
        if address.cluster_ip and address.ports:
            cluster_ip = (address.cluster_ip, address.ports[0][1])
    host, port = node.config.kubernetes_service_address(cluster_ip)
    services = [envvars.ServiceAddress("kubernetes", host, (("https", port, "TCP"),))]
    namespace = pod["metadata"]["namespace"]
    if pod["spec"].get("enableServiceLinks", True):
        for svc in node.objects.services(namespace):
            if svc["metadata"]["name"] == "kubernetes" and namespace == "default":
                continue
            services.append(envvars.service_address(svc))
    return envvars.service_variables(services)


def build(node: NodeServices, sandbox: Sandbox, container: dict[str, Any]) -> LaunchSpec:
    """The LaunchSpec of one container (raises ConfigError/NotReady/VolumeError/ValueError)."""
    pod, img, cfg = sandbox.pod, node.current_image(), node.config
    ctx = envvars.EnvContext(
        sandbox.pod_ip, cfg.node_ip, node.allocatable(), service_env(node, pod)
    )
    pod_env = envvars.container_env(pod, container, ctx, node.objects)
    argv = container_argv(
        img.entrypoint, img.cmd, container.get("command"), container.get("args"), pod_env
    )
    hostname = sandbox.hostname or pod_hostname(pod)
    uid, gid, groups = identity(pod, container, img)
    img_uid, img_gid = img.uid_gid
    files: list[tuple[str, str, int]] = []
    if sandbox.netns is not None:
        hosts = (
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{sandbox.pod_ip}\t{hostname}\n"
        )
        files = [("/etc/hosts", hosts, 0o644), ("/etc/hostname", hostname + "\n", 0o644)]
    files += image_account_files(img)
    sc = container.get("securityContext") or {}
    return LaunchSpec(
        argv=argv,
        env=envvars.process_env(img.env, hostname, pod_env),
        workdir=container.get("workingDir") or img.workdir,
        uid=uid,
        gid=gid,
        groups=groups,
        netns=sandbox.netns,
        hostname=None if sandbox.netns is None else hostname,
        scratch=str(sandbox.scratch),
        readonly_root=bool(sc.get("readOnlyRootFilesystem")),
        # The image's venv at its own prefix, then the pod's volumes.
        mounts=[{"source": img.venv, "target": img.prefix, "readonly": True}]
        + sandbox.volumes.mounts(container, pod_env),
        # The image's HOME belongs to its user (useradd --create-home), WORKDIR to root.
        dirs=[(img.env.get("HOME", "/root"), img_uid, img_gid, 0o755), (img.workdir, 0, 0, 0o755)],
        files=files,
        # Folders the image does not have: the host's private ones, the agent's state (other
        # pods' secrets) and the development venv, which pods must never run from.
        opaque=["/tmp", "/run", "/root", str(cfg.state_dir), str(image_mod.REPO / ".venv")],
    )
