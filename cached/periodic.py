"""The one shape of every background loop: do a thing every so often until the daemon stops.

``every`` calls ``tick`` every ``interval_s`` seconds until ``stopping`` is set. Stopping is
cooperative: a tick that has begun runs to its end (a gossip round, a gc pass), and the pause
between ticks ends at once when ``stopping`` is set. A ``wake`` event, when given, cuts a pause
short so a component can ask for a tick now (the reconciler, when a member changes status).

``tick`` catches its own per-item failures; an exception that escapes it ends the loop, and with
it the daemon's task group (systemd restarts the service). This module does not own the tasks:
the daemon starts each ``run()`` in its task group, under a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from typing import Any

Tick = Callable[[], Any]  # a plain function or a coroutine function; what it returns is not used


async def every(
    interval_s: float, stopping: asyncio.Event, tick: Tick, *, now: bool = False, wake: asyncio.Event | None = None
) -> None:
    """``tick()`` every ``interval_s`` until ``stopping``; the first right away when ``now``."""
    if not now:
        await pause(interval_s, stopping, wake)
    while not stopping.is_set():
        if wake is not None:
            wake.clear()  # a wake-up asked before this tick is answered by it
        result = tick()
        if inspect.isawaitable(result):
            await result
        await pause(interval_s, stopping, wake)


async def pause(seconds: float, stopping: asyncio.Event, wake: asyncio.Event | None = None) -> None:
    """Wait ``seconds``, or less if ``stopping`` (or ``wake``) is set meanwhile."""
    if wake is None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        return
    waiters = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
