"""The argv a container runs: Kubernetes' command/args over the image's ENTRYPOINT/CMD."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from splitserve.cluster.nodeagent.envvars import expand, lookup_in


def container_argv(
    entrypoint: Sequence[str],
    cmd: Sequence[str],
    command: Sequence[str] | None,
    args: Sequence[str] | None,
    env: Mapping[str, str],
) -> list[str]:
    """`command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD; both are expanded.

    Only the pod's own strings see `$(VAR)` expansion, against the container's env vars (not the
    image's ENV, which kubelet does not know). Raises ValueError when nothing is left to run.
    """
    lookup = lookup_in(env)
    command = [expand(c, lookup) for c in command] if command else None
    args = [expand(a, lookup) for a in args] if args else None
    if command:
        argv = command + (args or [])
    else:
        argv = list(entrypoint) + (args if args is not None else list(cmd))
    if not argv:
        raise ValueError("no command specified: neither the pod nor the image has one")
    return argv
