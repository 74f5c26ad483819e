"""engine/openmp.py: the engine's construction leaves no OpenMP workers behind, and the event
loop's thread runs torch ops without a team of its own (run in a fresh interpreter with 2 OpenMP
threads: both change process-wide OpenMP state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from splitserve.engine.openmp import in_own_thread

SCRIPT = """
import json, os, threading, time, torch
from splitserve.engine.openmp import in_own_thread, serial_in_this_thread

def threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    a = torch.randn(1024, 1024)
    (a @ a).sum()
    a.mul_(2.0)
    return threads()

def settled(expected):
    # The building thread's OpenMP workers exit on their own once it has: give them a moment.
    deadline = time.monotonic() + 10
    while threads() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return threads()

before = threads()
during = in_own_thread(parallel_op)
after_build = settled(before)
serial = serial_in_this_thread()
main_count = torch.get_num_threads()
other = []
t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
t.start(); t.join()
parallel_op()
print(json.dumps({"before": before, "during": during, "after_build": after_build,
                  "serial": serial, "main": main_count, "other": other[0],
                  "after_main_op": settled(before)}))
"""


def test_the_building_thread_takes_its_workers_and_the_loop_thread_stays_serial():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-P", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["serial"]:
        pytest.skip("torch here does not run on libgomp")
    assert r["during"] > r["before"], r  # the building thread had OpenMP workers...
    assert r["after_build"] == r["before"], r  # ...and they left with it
    assert r["main"] == 1 and r["other"] == 2, r  # only the calling thread went serial
    assert r["after_main_op"] == r["before"], r  # a big op there started no workers


def test_in_own_thread_returns_the_result_and_raises_the_error():
    assert in_own_thread(lambda: 41 + 1) == 42

    def fail():
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        in_own_thread(fail)
