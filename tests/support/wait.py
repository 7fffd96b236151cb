"""Wait for a condition, never for a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_until(
    pred: Callable[[], Any | Awaitable[Any]], *, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = ""
) -> Any:
    """Poll ``pred`` (sync or async) until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or pred}")
        await asyncio.sleep(interval_s)
