"""Waiting for a condition that another process makes true, with a bound.

The one place tests wait on the outside world (a Ray actor's state, a process exiting, a
guest's serial console): `poll` checks the condition, and between checks sleeps a short
interval, failing with the last value seen once the deadline passes.
"""
from __future__ import annotations

import time


def poll(fn, timeout_s: float, interval_s: float = 0.1):
    """fn() until it returns something true; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"not reached within {timeout_s} s; last: {last!r}")
