"""`splitserve operator`: run the operator, render an InferenceService, or print the CRD.

- ``run``: the kopf operator (in-cluster service account, or the kubeconfig).
- ``render -f FILE``: validate InferenceService documents against the CRD's schema (exit 1 and
  name the offending fields if invalid) and print the objects the operator would create, as
  YAML, for review in GitOps pipelines.
- ``crd``: print the CRD (the source of the copies in charts/ and manifests/).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from splitserve.operator import crd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sub-subcommands on the `splitserve operator` parser."""
    sub = parser.add_subparsers(dest="action", required=True)
    run_p = sub.add_parser("run", help="run the operator against the cluster")
    run_p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: every namespace",
    )
    run_p.add_argument(
        "--interval", type=float, default=30.0, help="seconds between drift-correcting passes"
    )
    run_p.add_argument(
        "--autoscale-interval",
        type=float,
        default=10.0,
        help="seconds between autoscaling passes (docs/autoscaling.md)",
    )
    run_p.add_argument(
        "--health-port",
        type=int,
        default=8080,
        help="port of /healthz, /readyz and /metrics (0: none)",
    )
    run_p.add_argument(
        "--leader-elect",
        action="store_true",
        help="reconcile only while holding a coordination.k8s.io Lease (run several replicas)",
    )
    run_p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE)",
    )
    run_p.add_argument("--lease-name", default="splitserve-operator")
    run_p.add_argument("--lease-duration", type=float, default=15.0, help="seconds")
    run_p.add_argument("--renew-deadline", type=float, default=10.0, help="seconds")
    run_p.add_argument("--retry-period", type=float, default=2.0, help="seconds")
    render_p = sub.add_parser("render", help="validate an InferenceService and print its objects")
    render_p.add_argument("-f", "--filename", required=True, help="YAML file ('-' for stdin)")
    render_p.add_argument(
        "-n", "--namespace", default="default", help="namespace for objects that name none"
    )
    sub.add_parser("crd", help="print the InferenceService CRD")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action; returns the process exit code."""
    if args.action == "crd":
        sys.stdout.write(crd.crd_text())
        return 0
    if args.action == "render":
        return render(args.filename, args.namespace)
    return _run_operator(args)


def _load_documents(filename: str) -> list[dict[str, Any]]:
    if filename == "-":
        text = sys.stdin.read()
    else:
        with open(filename, encoding="utf-8") as handle:
            text = handle.read()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def render_objects(documents: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The children of every InferenceService document (raises SpecError on the first bad one)."""
    from splitserve.operator.builders import build_desired
    from splitserve.operator.spec import parse

    objects: list[dict[str, Any]] = []
    for doc in documents:
        objects += build_desired(parse(doc, default_namespace=namespace))
    return objects


def render(filename: str, namespace: str = "default") -> int:
    """`render -f FILE`: 0 and YAML on stdout, or 1 and the offending fields on stderr."""
    from splitserve.operator.spec import SpecError

    try:
        documents = _load_documents(filename)
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: cannot read {filename}: {exc}", file=sys.stderr)
        return 1
    failed = False
    for index, doc in enumerate(documents):
        name = (doc.get("metadata") or {}).get("name", f"document {index}")
        try:
            render_objects([doc], namespace)
        except SpecError as exc:
            failed = True
            for error in exc.errors:
                print(f"error: {name}: {error}", file=sys.stderr)
    if failed:
        return 1
    if not documents:
        print(f"error: {filename} holds no InferenceService", file=sys.stderr)
        return 1
    sys.stdout.write(dump_yaml(render_objects(documents, namespace)))
    return 0


class _PlainDumper(yaml.SafeDumper):
    """Never writes anchors/aliases: builders share small dicts, reviewers want plain YAML."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as a multi-document YAML stream, fields in builder order, no aliases."""
    return yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)


def _run_operator(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    import kopf

    from splitserve.operator.leader import LeaseConfig
    from splitserve.operator.runner import RunConfig, operate

    # kopf would name itself after getpass.getuser(), which fails for a uid with no passwd entry
    # (OpenShift's random UIDs, any image without the user): the pod's name says more anyway.
    identity = os.environ.get("POD_NAME") or socket.gethostname()
    lease = None
    if args.leader_elect:
        lease = LeaseConfig(
            namespace=args.lease_namespace,
            identity=identity,
            name=args.lease_name,
            lease_duration_s=args.lease_duration,
            renew_deadline_s=args.renew_deadline,
            retry_period_s=args.retry_period,
        )
    config = RunConfig(
        identity=identity,
        namespaces=tuple(args.namespace),
        interval=args.interval,
        autoscale_interval=args.autoscale_interval,
        health_port=args.health_port,
        lease=lease,
    )
    kopf.configure(log_format=kopf.LogFormat.PLAIN)
    return asyncio.run(operate(config))
