"""Routing policies and the retry budget: pure functions, no servers."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitserve.services.router.policy import Candidate, Weights, choose, score
from splitserve.services.router.retry import RetryBudget, RetryConfig

W = Weights()


def test_prefix_wins_over_small_load_difference():
    a = Candidate("a", matched_blocks=60, running=3)
    b = Candidate("b", matched_blocks=0, running=0)
    assert choose("prefix", [a, b], total_blocks=63, weights=W).pod_id == "a"


def test_heavy_load_overrides_prefix():
    a = Candidate("a", matched_blocks=60, waiting=40, running=32, kv_usage=0.95)
    b = Candidate("b", matched_blocks=0)
    assert choose("prefix", [a, b], total_blocks=63, weights=W).pod_id == "b"


def test_least_load_ignores_prefix_and_counts_router_inflight():
    a = Candidate("a", matched_blocks=60, inflight=5)
    b = Candidate("b", matched_blocks=0, inflight=1)
    assert choose("least_load", [a, b], total_blocks=63, weights=W).pod_id == "b"


def test_round_robin_cycles():
    cands = [Candidate(x) for x in "cab"]
    picks = [
        choose("round_robin", cands, total_blocks=0, weights=W, counter=i).pod_id for i in range(6)
    ]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_ties_spread_evenly():
    cands = [Candidate(x) for x in "abcd"]
    picks = Counter(
        choose("prefix", cands, total_blocks=4, weights=W, counter=i).pod_id for i in range(400)
    )
    assert set(picks.values()) == {100}


@given(st.text(min_size=1, max_size=20), st.integers(2, 6))
def test_session_affinity_is_stable_and_survives_unrelated_pod_loss(key, n):
    cands = [Candidate(f"pod-{i}") for i in range(n)]
    first = choose("session", cands, total_blocks=0, weights=W, session_key=key).pod_id
    again = choose("session", cands[::-1], total_blocks=0, weights=W, session_key=key, counter=7)
    assert again.pod_id == first
    others = [c for c in cands if c.pod_id != first]
    if len(others) >= 2:
        lost = others[0]
        rest = [c for c in cands if c is not lost]
        assert choose("session", rest, total_blocks=0, weights=W, session_key=key).pod_id == first


def test_session_without_key_falls_back_to_prefix():
    a, b = Candidate("a", matched_blocks=4), Candidate("b")
    assert choose("session", [a, b], total_blocks=4, weights=W).pod_id == "a"


def test_score_is_monotone():
    base = Candidate("a", matched_blocks=2, running=1)
    assert score(Candidate("a", matched_blocks=3, running=1), 4, W) > score(base, 4, W)
    assert score(Candidate("a", matched_blocks=2, running=2), 4, W) < score(base, 4, W)


def test_bad_inputs():
    with pytest.raises(ValueError):
        choose("prefix", [], total_blocks=0, weights=W)
    with pytest.raises(ValueError):
        choose("random", [Candidate("a")], total_blocks=0, weights=W)
    with pytest.raises(ValueError):
        Weights(capacity=0)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_retry_budget_floor_ratio_and_attempt_cap():
    clock = Clock()
    budget = RetryBudget(RetryConfig(max_attempts=3, ratio=0.5, min_tokens=2, window_s=10), clock)
    assert not budget.try_retry(4)  # beyond max_attempts, whatever the budget
    assert budget.try_retry(2) and budget.try_retry(2)
    assert not budget.try_retry(2)  # the floor is spent
    for _ in range(4):
        budget.on_request()  # 4 requests x 0.5 = 2 retries
    assert budget.try_retry(2) and budget.try_retry(2)
    assert not budget.try_retry(2)
    clock.t = 5.0  # half a window refills half the floor
    assert budget.try_retry(2)
    assert not budget.try_retry(2)
    assert budget.retries == 5 and budget.denied == 3
