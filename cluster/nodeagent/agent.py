"""The agent's wiring: checks, image, cleanup, node registration, the pod watch, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from splitserve.cluster import image
from splitserve.cluster.nodeagent import cleanup, network
from splitserve.cluster.nodeagent.config import AgentConfig, parse_args
from splitserve.cluster.nodeagent.ipam import IPAllocator
from splitserve.cluster.nodeagent.kube import Kube
from splitserve.cluster.nodeagent.launchspec import NodeServices
from splitserve.cluster.nodeagent.node import NodeRegistration
from splitserve.cluster.nodeagent.objects import ApiObjects, TokenIssuer
from splitserve.cluster.nodeagent.podmanager import PodManager
from splitserve.cluster.nodeagent.runtime import Runtime, Spawner
from splitserve.cluster.nodeagent.statuswriter import StatusWriter

log = logging.getLogger("splitserve.cluster.nodeagent")


class SetupError(Exception):
    """Something the agent needs is missing; the message says what."""


def preflight(config: AgentConfig) -> None:
    """Fail fast and clearly instead of hanging later."""
    if os.geteuid() != 0:
        raise SetupError("the node agent needs root (network and mount namespaces)")
    for path, what in ((config.kubeconfig, "kubeconfig"), (config.ca_file, "CA file")):
        if not path.is_file():
            raise SetupError(f"{what} {path} does not exist")
    network.check_bridge(config.bridge)


def ensure_image(config: AgentConfig) -> image.ImageConfig:
    """The image venv, refreshed from the sources first unless --no-build-image."""
    if config.build_image:
        return image.build(image.REPO, config.image_dir)
    try:
        return image.load(config.image_dir)
    except FileNotFoundError as exc:
        raise SetupError(
            f"no image at {config.image_dir}: run `python -P -m splitserve.cluster.image build`"
        ) from exc


def run(config: AgentConfig) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    # Installed first: a SIGTERM during start-up (registration, image build) ends cleanly too.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    preflight(config)
    config.pods_dir.mkdir(parents=True, exist_ok=True)
    cleanup.leftovers(config.state_dir)
    kube = Kube(config.kubeconfig, config.api_timeout_s)
    node = NodeRegistration(kube, config)
    node.register()
    node.start()
    # The node is Ready before the image is refreshed (seconds, or minutes for a full rebuild):
    # pods bound meanwhile wait, as they would for an image pull.
    img = ensure_image(config)
    log.info("image %s (%s)", img.id[:12], img.venv)
    if stop.is_set():
        node.stop()
        return 0
    spawner = Spawner()
    writer = StatusWriter(kube, config.node_name)
    services = NodeServices(
        config=config,
        kube=kube,
        objects=ApiObjects(kube),
        tokens=TokenIssuer(kube),
        runtime=Runtime(spawner, config.state_dir / "exec"),
        ipam=IPAllocator(config.state_dir / "ipam.json", config.pod_cidr, config.gateway),
        writer=writer,
        image=img,
        allocatable=lambda: dict(node.allocatable),
        host_hostname=socket.gethostname(),
    )
    manager = PodManager(services)
    watcher = threading.Thread(target=manager.run, name="pod-watch", daemon=True)
    watcher.start()
    log.info("node %s ready; pod CIDR %s", config.node_name, config.pod_cidr)
    while not stop.wait(1.0):
        pass
    manager.shutdown()
    node.stop()
    writer.stop()
    spawner.stop()
    cleanup.leftovers(config.state_dir)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("NODEAGENT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry chatter
    try:
        return run(parse_args(argv))
    except (SetupError, network.NetworkError) as exc:
        log.error("%s", exc)
        return 2
