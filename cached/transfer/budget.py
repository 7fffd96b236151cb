"""A token bucket: bytes per second shared by every transfer that takes from it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """``take(n)`` waits until ``n`` bytes fit the rate; a rate of 0 never waits."""

    def __init__(self, rate_bps: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_bps
        self._clock = clock
        self._level = float(rate_bps)
        self._stamp = clock()

    async def take(self, n: int) -> None:
        if self._rate <= 0:
            return
        while True:
            now = self._clock()
            self._level = min(float(self._rate), self._level + (now - self._stamp) * self._rate)
            self._stamp = now
            # A request larger than one second's budget goes once the bucket is full.
            if self._level >= n or self._level >= self._rate:
                self._level -= n
                return
            await asyncio.sleep((min(n, self._rate) - self._level) / self._rate)
