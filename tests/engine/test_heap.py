"""The heap trimmer trims when the engine goes idle and at most every interval under load."""

from __future__ import annotations

from splitserve.engine import heap


def test_trims_when_idle_and_when_due(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_trim", lambda pad: calls.append(pad) or 1)
    now = [0.0]
    t = heap.HeapTrimmer(interval=30.0, clock=lambda: now[0])
    assert not t.maybe_trim(idle=False)  # busy, not due yet
    assert t.maybe_trim(idle=True)  # went idle: trim
    now[0] = 29.0
    assert not t.maybe_trim(idle=False)
    now[0] = 31.0
    assert t.maybe_trim(idle=False)  # due under load
    assert calls == [0, 0] and t.trims == 2


def test_the_real_trim_runs():
    t = heap.HeapTrimmer()
    assert t.maybe_trim(idle=True) == (heap._trim is not None)


def test_the_period_comes_from_the_environment_and_zero_turns_it_off(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_trim", lambda pad: calls.append(pad) or 1)
    monkeypatch.setenv("SPLITSERVE_HEAP_TRIM_SECONDS", "0")
    off = heap.HeapTrimmer()
    assert not off.maybe_trim(idle=True) and calls == []
    monkeypatch.setenv("SPLITSERVE_HEAP_TRIM_SECONDS", "5")
    assert heap.HeapTrimmer().interval == 5.0
