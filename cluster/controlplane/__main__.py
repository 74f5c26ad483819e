"""`python -P -m splitserve.cluster.controlplane up|down|env|url|status` (scripts/cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitserve.cluster.controlplane.cluster import Cluster, ClusterError, UpOptions
from splitserve.cluster.controlplane.health import Probe
from splitserve.cluster.controlplane.layout import Layout
from splitserve.cluster.controlplane.service_url import ServiceRef, ServiceUrlError, service_url


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="scripts/cluster",
        description="The local Kubernetes test cluster (see docs/testing.md).",
    )
    top.add_argument("--root", type=Path, default=None, help="the checkout (default: this one)")
    sub = top.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster (a no-op health check when it is up)")
    up.add_argument("--no-node", action="store_true", help="the control plane alone")
    up.add_argument("--no-proxy", action="store_true", help="without kube-proxy")
    up.add_argument("--no-build", action="store_true", help="fail instead of building binaries")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per program")
    down = sub.add_parser("down", help="stop everything and remove the bridge (idempotent)")
    down.add_argument("--purge", action="store_true", help="also delete etcd data, PKI, logs")
    sub.add_parser("env", help="print `export KUBECONFIG=...` for the admin")
    url = sub.add_parser("url", help="print an http:// address on this host for a Service")
    url.add_argument("service", metavar="NAMESPACE/SERVICE")
    url.add_argument("port", nargs="?", default=None, help="port number or name")
    sub.add_parser("status", help="each program's pid and health (exit 1 when unhealthy)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        layout = Layout.for_checkout(args.root)
    except ValueError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2
    cluster = Cluster(layout)
    try:
        if args.command == "up":
            cluster.up(
                UpOptions(
                    node=not args.no_node,
                    proxy=not args.no_proxy,
                    build=not args.no_build,
                    timeout=args.timeout,
                )
            )
        elif args.command == "down":
            cluster.down(purge=args.purge)
        elif args.command == "env":
            print(f"export KUBECONFIG={layout.admin_kubeconfig}")
        elif args.command == "url":
            if cluster.pid("kube-apiserver") is None:
                raise ClusterError("the cluster is not up (`scripts/cluster up`)")
            api: Probe = cluster.api()
            proxy_running = cluster.pid("kube-proxy") is not None
            ref = ServiceRef.parse(args.service)
            print(service_url(api, ref, args.port, proxy_running))
        elif args.command == "status":
            return 0 if cluster.status() else 1
    except (ClusterError, ServiceUrlError) as exc:
        print(f"cluster {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cluster {args.command}: {exc} (is the cluster up? `scripts/cluster status`)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
