"""The command line of each cluster program: the flags that make it a real, small cluster.

Modelled on kubernetes' hack/local-up-cluster.sh, trimmed to one node with no kubelet:
etcd on loopback; the API server with RBAC + Node authorization, NodeRestriction and the default
admission plugins, and service-account tokens it issues and signs itself; the controller
manager with every default controller, each on its own service account; the scheduler; kube-proxy
in iptables mode; then the node agent (the emulated kubelet, see docs/testing.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from splitserve.cluster.controlplane.layout import NODE_AGENT, ClusterSpec, Layout
from splitserve.cluster.controlplane.pki import Pki
from splitserve.cluster.controlplane.processes import ProcessSpec

NODE_AGENT_MODULE = "splitserve.cluster.nodeagent"
# Added to the API server's default admission plugins (which already hold NamespaceLifecycle,
# LimitRanger, ServiceAccount, DefaultStorageClass, ResourceQuota, the webhooks, ...).
ADMISSION = "NodeRestriction"
VERBOSITY = "--v=1"
SUPERVISE = (sys.executable, "-P", "-m", "splitserve.cluster.controlplane.supervise", "--")


def etcd(layout: Layout, spec: ClusterSpec) -> ProcessSpec:
    peer = f"http://127.0.0.1:{spec.etcd_peer_port}"
    return ProcessSpec(
        "etcd",
        (
            str(layout.binary("etcd")),
            "--name=splitserve",
            f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls={spec.etcd_url}",
            f"--advertise-client-urls={spec.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=splitserve={peer}",
            # A throwaway test store on a shared disk: no fsync keeps writes fast on busy cores.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ),
    )


def apiserver(layout: Layout, spec: ClusterSpec, pki: Pki) -> ProcessSpec:
    issuer = f"https://kubernetes.default.svc.{spec.cluster_domain}"
    return ProcessSpec(
        "kube-apiserver",
        (
            str(layout.binary("kube-apiserver")),
            f"--etcd-servers={spec.etcd_url}",
            "--bind-address=0.0.0.0",
            f"--secure-port={spec.apiserver_port}",
            # The `kubernetes` Service's endpoint: pods reach it over the bridge.
            f"--advertise-address={spec.host_ip}",
            f"--service-cluster-ip-range={spec.service_cidr}",
            f"--tls-cert-file={pki.apiserver_cert}",
            f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={ADMISSION}",
            f"--service-account-issuer={issuer}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--allow-privileged=true",
            f"--cert-dir={layout.state / 'apiserver-certs'}",
            "--profiling=false",
            VERBOSITY,
        ),
    )


def controller_manager(layout: Layout, spec: ClusterSpec, pki: Pki) -> ProcessSpec:
    kubeconfig = layout.kubeconfig("kube-controller-manager")
    return ProcessSpec(
        "kube-controller-manager",
        (
            str(layout.binary("kube-controller-manager")),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            *_delegated_authn(pki),
            # Every controller acts as its own service account, so RBAC applies to each.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}",
            # Published into every namespace as the kube-root-ca.crt ConfigMap.
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={spec.service_cidr}",
            "--controllers=*",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={spec.controller_manager_port}",
            f"--cert-dir={layout.state / 'controller-manager-certs'}",
            "--profiling=false",
            VERBOSITY,
        ),
    )


def write_configs(layout: Layout, spec: ClusterSpec) -> None:
    """Write the scheduler's and kube-proxy's configuration files (before they start)."""
    _write_config(
        _scheduler_config(layout),
        {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(layout.kubeconfig("kube-scheduler"))},
            "leaderElection": {"leaderElect": False},
        },
    )
    _write_config(
        _proxy_config(layout),
        {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(layout.kubeconfig("kube-proxy"))},
            "hostnameOverride": spec.node_name,
            "mode": "iptables",
            # Traffic from outside this range (the host) to a Service is masqueraded.
            "clusterCIDR": spec.pod_cidr,
            "healthzBindAddress": f"127.0.0.1:{spec.proxy_healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{spec.proxy_metrics_port}",
            # Leave the host's conntrack sysctls alone (as local-up-cluster.sh does).
            "conntrack": {
                "maxPerCore": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        },
    )


def scheduler(layout: Layout, spec: ClusterSpec, pki: Pki) -> ProcessSpec:
    kubeconfig = layout.kubeconfig("kube-scheduler")
    return ProcessSpec(
        "kube-scheduler",
        (
            str(layout.binary("kube-scheduler")),
            f"--config={_scheduler_config(layout)}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            *_delegated_authn(pki),
            "--bind-address=127.0.0.1",
            f"--secure-port={spec.scheduler_port}",
            f"--cert-dir={layout.state / 'scheduler-certs'}",
            VERBOSITY,
        ),
    )


def proxy(layout: Layout, spec: ClusterSpec) -> ProcessSpec:
    # Under a restarting supervisor: kube-proxy exits by design when its Node's IPs change.
    return ProcessSpec(
        "kube-proxy",
        (
            *SUPERVISE,
            str(layout.binary("kube-proxy")),
            f"--config={_proxy_config(layout)}",
            VERBOSITY,
        ),
        env={"PYTHONSAFEPATH": "1"},
    )


def proxy_cleanup_argv(layout: Layout) -> tuple[str, ...]:
    """kube-proxy's own removal of the rules it installed (run by `down`)."""
    return (str(layout.binary("kube-proxy")), "--cleanup", VERBOSITY)


def node_agent(layout: Layout, spec: ClusterSpec, pki: Pki) -> ProcessSpec:
    """The node agent, with the command line agreed with it (docs/testing.md, "The node agent")."""
    return ProcessSpec(
        NODE_AGENT,
        (
            sys.executable,
            "-P",
            "-m",
            NODE_AGENT_MODULE,
            "--kubeconfig",
            str(layout.kubeconfig("node")),
            "--node-name",
            spec.node_name,
            "--bridge",
            spec.bridge,
            "--pod-cidr",
            spec.pod_cidr,
            "--gateway",
            spec.host_ip,
            "--state-dir",
            str(layout.node_state),
            "--apiserver-host",
            spec.host_ip,
            "--apiserver-port",
            str(spec.apiserver_port),
            "--ca-file",
            str(pki.ca_cert),
        ),  # fmt: skip
        env={"PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"},
        cwd=layout.root,
        # It stops its pods itself (preStop hooks, grace periods): SIGTERM only to it, and time.
        stop_timeout=45.0,
        term_group=False,
    )


def _delegated_authn(pki: Pki) -> tuple[str, ...]:
    # Client certificates from our CA, and no lookup of the front-proxy (request-header) CA in
    # kube-system/extension-apiserver-authentication: there is no front proxy, and the lookup
    # would log a "missing content for CA bundle" error every minute.
    return ("--authentication-skip-lookup=true", f"--client-ca-file={pki.ca_cert}")


def _scheduler_config(layout: Layout) -> Path:
    return layout.config / "kube-scheduler.yaml"


def _proxy_config(layout: Layout) -> Path:
    return layout.config / "kube-proxy.yaml"


def _write_config(path: Path, doc: dict) -> None:
    # Only when it changed: kube-proxy watches its config file and exits on any write to it.
    text = yaml.safe_dump(doc, sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
