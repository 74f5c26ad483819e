"""`up`, `down` and `status` of the local cluster: the order of things, the waits, the report.

`up` is idempotent per program: it starts only what is not running, then waits for every
program's health, so a second `up` on a healthy cluster only checks it, and an `up` after one
program died restarts just that one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.cluster.controlplane import components, kubeconfig, network, prereqs, processes
from splitserve.cluster.controlplane.health import NotReady, Probe, node_ready, wait_for
from splitserve.cluster.controlplane.layout import NODE_AGENT, ClusterSpec, Layout
from splitserve.cluster.controlplane.pki import Pki, ensure_pki
from splitserve.cluster.controlplane.processes import ProcessSpec, Started

Printer = Callable[[str], None]


class ClusterError(RuntimeError):
    """`up` cannot proceed or a program did not come up; the message is for the user as is."""


@dataclass(frozen=True)
class UpOptions:
    """What `up` starts and how long it waits for each program."""

    node: bool = True
    proxy: bool = True
    build: bool = True
    timeout: float = 180.0


class Cluster:
    """The local cluster of one checkout."""

    def __init__(self, layout: Layout, spec: ClusterSpec | None = None, out: Printer = print):
        self.layout = layout
        self.spec = spec or ClusterSpec()
        self.out = out

    # -- what runs -------------------------------------------------------------------------------

    def programs(self, pki: Pki, options: UpOptions) -> list[ProcessSpec]:
        """The programs `up` starts, in start order."""
        layout, spec = self.layout, self.spec
        wanted = [
            components.etcd(layout, spec),
            components.apiserver(layout, spec, pki),
            components.controller_manager(layout, spec, pki),
            components.scheduler(layout, spec, pki),
        ]
        # The Node first, as on a real node: kube-proxy takes its node IP from the Node object
        # (without one it waits 30 s, then assumes loopback).
        if options.node:
            wanted.append(components.node_agent(layout, spec, pki))
        if options.proxy:
            wanted.append(components.proxy(layout, spec))
        return wanted

    def pid(self, name: str) -> int | None:
        return processes.read_pid(self.layout.pidfile(name))

    def api(self) -> Probe:
        """The API server, as the admin."""
        pki = Pki(self.layout.pki)
        return Probe(
            self.spec.apiserver_url,
            ca=pki.ca_cert,
            cert=(pki.client_cert("admin"), pki.client_key("admin")),
        )

    def probes(self) -> dict[str, Probe]:
        """Each program's health endpoint (the node agent's health is its Node's Ready)."""
        spec = self.spec
        return {
            "etcd": Probe(f"{spec.etcd_url}/health"),
            "kube-apiserver": Probe(self.api().url + "/readyz", self.api().ca, self.api().cert),
            "kube-controller-manager": Probe(
                f"https://127.0.0.1:{spec.controller_manager_port}/healthz", insecure=True
            ),
            "kube-scheduler": Probe(
                f"https://127.0.0.1:{spec.scheduler_port}/healthz", insecure=True
            ),
            # /livez: the proxier's own sync health (/healthz also asks that the Node exists).
            "kube-proxy": Probe(f"http://127.0.0.1:{spec.proxy_healthz_port}/livez"),
        }

    def ports(self) -> dict[str, int]:
        spec = self.spec
        return {
            "etcd": spec.etcd_client_port,
            "etcd-peer": spec.etcd_peer_port,
            "kube-apiserver": spec.apiserver_port,
            "kube-controller-manager": spec.controller_manager_port,
            "kube-scheduler": spec.scheduler_port,
            "kube-proxy": spec.proxy_healthz_port,
        }

    # -- up --------------------------------------------------------------------------------------

    def up(self, options: UpOptions) -> None:
        """Bring the cluster up (or check it, if it is up); raises ClusterError."""
        begin = time.monotonic()
        names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
        names += ["kube-proxy"] if options.proxy else []
        to_start = [name for name in names if self.pid(name) is None]
        ports = {
            owner: port
            for owner, port in self.ports().items()
            if owner.removesuffix("-peer") in to_start
        }
        needs = prereqs.Needs(proxy=options.proxy, node=options.node, build=options.build)
        found = prereqs.problems(self.layout, self.spec, needs, ports)
        if found:
            raise ClusterError("cannot start the cluster:\n  - " + "\n  - ".join(found))
        self._build()
        pki = ensure_pki(self.layout.pki, self.spec)
        kubeconfig.write_all(self.layout, self.spec, pki)
        components.write_configs(self.layout, self.spec)
        try:
            for note in network.ensure_host_network(self.spec):
                self.out(f"note: {note}")
        except network.NetworkError as exc:
            raise ClusterError(f"cannot set up the host network: {exc}") from exc

        probes = self.probes()
        started: list[Started] = []
        try:
            for program in self.programs(pki, options):
                fresh = self.pid(program.name) is None
                if fresh:
                    started.append(self._start(program))
                waited = self._wait_healthy(program.name, probes, options.timeout, started)
                if fresh:
                    self.out(f"  {program.name} ready after {waited:.0f} s")
        except NotReady as exc:
            raise ClusterError(str(exc)) from exc
        verb = "started " + ", ".join(s.spec.name for s in started) if started else "already up"
        self.out(f"cluster up ({verb}; {time.monotonic() - begin:.0f} s)")
        self.out(f"  export KUBECONFIG={self.layout.admin_kubeconfig}")

    def _build(self) -> None:
        if prereqs.binaries_current(self.layout):
            return
        self.out("building the control-plane binaries (a cold build: 15-27 min on 2 cores)")
        proc = subprocess.run(("bash", str(self.layout.build_script), str(self.layout.bin_dir)))
        if proc.returncode != 0:
            raise ClusterError(
                f"building the control-plane binaries failed (exit {proc.returncode})"
            )

    def _start(self, program: ProcessSpec) -> Started:
        if program.name == "etcd":
            self.layout.etcd_data.mkdir(parents=True, exist_ok=True)
            self.layout.etcd_data.chmod(0o700)
        if program.name == NODE_AGENT:
            self.layout.node_state.mkdir(parents=True, exist_ok=True)
        self.out(f"starting {program.name} (log: {self.layout.log(program.name)})")
        return processes.start(
            program, self.layout.pidfile(program.name), self.layout.log(program.name)
        )

    def _wait_healthy(
        self, name: str, probes: dict[str, Probe], timeout: float, started: list[Started]
    ) -> float:
        log = self.layout.log(name)
        if name == NODE_AGENT:
            what = f"Node {self.spec.node_name} (Ready)"
            api = self.api()
            ready = lambda: node_ready(api, self.spec.node_name)  # noqa: E731
            return wait_for(what, ready, timeout, log, started)
        return wait_for(name, probes[name].healthy, timeout, log, started)

    # -- down ------------------------------------------------------------------------------------

    def down(self, purge: bool = False) -> None:
        """Stop every program (in reverse start order), remove the host network; idempotent.

        `purge` also deletes the state (etcd data, PKI, kubeconfigs, logs, the node's folder).
        """
        pki = Pki(self.layout.pki)
        everything = self.programs(pki, UpOptions())
        stopped = []
        for program in reversed(everything):
            pidfile = self.layout.pidfile(program.name)
            if processes.stop(pidfile, program.stop_timeout, program.term_group):
                stopped.append(program.name)
        removed = []
        # kube-proxy's rules go even when it died before `down` (its --cleanup is idempotent).
        if self.layout.binary("kube-proxy").exists() and shutil.which("iptables"):
            cleanup = components.proxy_cleanup_argv(self.layout)
            subprocess.run(cleanup, capture_output=True, timeout=120, check=False)
            removed += network.remove_kube_firewall()
        removed += network.teardown_host_network(self.spec)
        if purge:
            shutil.rmtree(self.layout.state, ignore_errors=True)
            removed.append(f"state {self.layout.state}")
        self.out(
            "cluster down"
            + (f"; stopped {', '.join(stopped)}" if stopped else "; nothing was running")
            + (f"; removed {', '.join(removed)}" if removed else "")
        )

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> bool:
        """Print each program's pid and health; True when the control plane is healthy and
        every program that runs is healthy."""
        probes = self.probes()
        core = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
        ok = True
        for name in (*probes, NODE_AGENT):
            pid = self.pid(name)
            if name == NODE_AGENT:
                healthy = pid is not None and node_ready(self.api(), self.spec.node_name)
            else:
                healthy = pid is not None and probes[name].healthy()
            state = "stopped" if pid is None else ("healthy" if healthy else "UNHEALTHY")
            if (pid is None and name in core) or (pid is not None and not healthy):
                ok = False
            self.out(f"{name:24} {state:10} {'pid ' + str(pid) if pid else ''}")
        if shutil.which("ip"):
            self.out(network.bridge_state(self.spec))
        self.out(f"logs: {self.layout.logs}")
        return ok
