"""Refusing incompatible KV peers, naming every fact that differs."""

from __future__ import annotations

from splitserve.kvtransfer.errors import IncompatiblePeerError
from splitserve.protocol.kv_compat import CompatInfo, differences


def check_compatible(
    local: CompatInfo, remote: CompatInfo, names: tuple[str, str] = ("local", "remote")
) -> None:
    """Raise ``IncompatiblePeerError`` naming each differing field; return if compatible.

    ``names`` label the two sides in the message (e.g. ``("source", "reader")``).
    """
    diff = differences(local, remote, names)
    if diff:
        raise IncompatiblePeerError(
            "incompatible KV peers: " + "; ".join(diff),
            differences=tuple(d.split(":", 1)[0] for d in diff),
        )
