"""Routing policies: pure functions from candidate pods (prefix match + load) to one choice.

``prefix`` (default) scores ``prefix_weight * matched_fraction - load_weight * load`` where
``matched_fraction`` is the share of the prompt's full blocks the pod already caches and ``load``
is normalised queue pressure; the load term breaks ties and keeps one hot prefix from piling every
request onto one pod once its queue grows. ``least_load`` is the same with no prefix term,
``round_robin`` ignores both, and ``session`` pins a session key (a header) to a pod by rendezvous
hashing, so a conversation keeps hitting the pod that holds its history, falling back to ``prefix``
for requests without the header.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("prefix", "round_robin", "least_load", "session")


@dataclass(frozen=True)
class Weights:
    """Scoring weights. ``capacity`` is the queue depth at which a pod counts as fully loaded."""

    prefix: float = 1.0
    load: float = 0.5
    waiting: float = 2.0  # a waiting request costs more than a running one: it adds queueing delay
    running: float = 1.0
    kv_usage: float = 1.0  # in units of `capacity` requests at 100% KV usage
    capacity: float = 32.0
    adapter: float = 0.5  # LoRA: running the request's adapter already (+), or slots full (-)

    def __post_init__(self) -> None:
        if self.prefix < 0 or self.load < 0 or self.capacity <= 0:
            raise ValueError(f"invalid routing weights: {self}")


@dataclass(frozen=True)
class Candidate:
    """What the policy knows about one pod for one request."""

    pod_id: str
    matched_blocks: int = 0
    running: int = 0  # engine-reported (GetStats), possibly a poll behind
    waiting: int = 0
    kv_usage: float = 0.0
    inflight: int = 0  # requests this router has outstanding on the pod right now
    adapter_affinity: int = 0  # +1 its adapter runs there, -1 no adapter slot free, else 0


def load_of(c: Candidate, w: Weights) -> float:
    """Normalised load in [0, ~2]: engine queues plus the router's own fresher in-flight count."""
    queue = w.running * max(c.running, c.inflight) + w.waiting * c.waiting
    return queue / w.capacity + w.kv_usage * c.kv_usage


def score(c: Candidate, total_blocks: int, w: Weights, use_prefix: bool = True) -> float:
    fraction = c.matched_blocks / total_blocks if use_prefix and total_blocks > 0 else 0.0
    return w.prefix * fraction - w.load * load_of(c, w) + w.adapter * c.adapter_affinity


def _rendezvous(key: str, pod_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{pod_id}".encode(), digest_size=8).digest())


def choose(
    policy: str,
    candidates: Sequence[Candidate],
    *,
    total_blocks: int,
    weights: Weights,
    counter: int = 0,
    session_key: str | None = None,
) -> Candidate:
    """Pick one candidate. ``counter`` drives round robin and rotates ties deterministically."""
    if not candidates:
        raise ValueError("no candidates")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    ordered = sorted(candidates, key=lambda c: c.pod_id)
    if policy == "round_robin":
        return ordered[counter % len(ordered)]
    if policy == "session" and session_key:
        return max(ordered, key=lambda c: _rendezvous(session_key, c.pod_id))
    use_prefix = policy != "least_load"
    # Rotate the start so equal scores spread over pods instead of always the first one.
    start = counter % len(ordered)
    rotated = ordered[start:] + ordered[:start]
    return max(rotated, key=lambda c: score(c, total_blocks, weights, use_prefix))
