"""A virtual clock for asyncio: an event loop whose time jumps to the next timer.

When no callback is ready, the loop does not wait: it advances its clock to the earliest
scheduled timer. Everything runs on one thread in a fixed order, so a seeded program run
on it twice does the same thing twice, however long its virtual timeouts are.
"""
from __future__ import annotations

import asyncio
import selectors


class _InstantSelector(selectors.SelectSelector):
    """Polls real file descriptors without blocking and moves virtual time forward."""

    def __init__(self):
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout=None):
        events = super().select(0)
        if not events and timeout and self.loop is not None:
            self.loop.advance(timeout)
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0):
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self
        self._virtual_now = start

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run(coro, start: float = 0.0):
    """Run `coro` to completion on a fresh virtual-time loop."""
    loop = VirtualLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
