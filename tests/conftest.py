"""Guards every test: no task may outlive its test, and nothing may block the event loop.

The loop guard is a heartbeat task plus a watcher thread: if the loop does not run the heartbeat
for ``BLOCK_LIMIT_S``, something blocked it (a sync hash, fsync or rmtree on the loop) and the
test fails, naming how long the loop stalled.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import pytest

BLOCK_LIMIT_S = 1.0
_HEARTBEAT = "test-guard.heartbeat"


@pytest.fixture(autouse=True)
async def loop_guard(request: pytest.FixtureRequest):
    if not inspect.iscoroutinefunction(getattr(request, "function", None)):
        yield  # a plain test never runs the loop; there is nothing to guard
        return
    beat = [time.monotonic()]
    worst = [0.0]
    stop = threading.Event()

    async def heartbeat() -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(0.05)

    def watch() -> None:
        while not stop.wait(0.05):
            worst[0] = max(worst[0], time.monotonic() - beat[0])

    task = asyncio.get_running_loop().create_task(heartbeat(), name=_HEARTBEAT)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield
    stop.set()
    watcher.join()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    current = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if leftover:
        # Give cancelled tasks one more turn of the loop before calling them leaked.
        await asyncio.sleep(0.1)
        leftover = [t for t in leftover if not t.done()]
    assert not leftover, f"test left tasks running: {[t.get_name() for t in leftover]}"
    # A test that starves the CPU on purpose (busy loops beside it) names its own limit: there the
    # scheduler, not a blocking call, keeps the loop waiting.
    marker = request.node.get_closest_marker("cpu_starved")
    limit = marker.args[0] if marker is not None else BLOCK_LIMIT_S
    assert worst[0] < limit, f"the event loop was blocked for {worst[0]:.2f}s"
