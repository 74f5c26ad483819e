"""The local cluster's control plane: real upstream programs, started and stopped by one tool.

- layout: where things live, and the fixed addresses/ports (ClusterSpec)
- pki, kubeconfig: certificates and one kubeconfig per identity, made once
- network: the host bridge the pods attach to
- components: each program's command line
- processes: detached start, pid files, SIGTERM-then-SIGKILL stop
- health: probes and bounded waits
- prereqs: what `up` checks before it starts anything
- cluster: up / down / status
- service_url: `url NAMESPACE/SERVICE`
- testing: the pytest helpers the cluster suites share

Entry point: `scripts/cluster` (python -P -m splitserve.cluster.controlplane). See docs/testing.md.
"""
