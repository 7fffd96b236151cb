"""One retry policy for every origin request: resolve, a piece, a whole-file stream.

A failed request is counted in ``cached_origin_errors_total`` by kind, then retried while its
``OriginError`` says it is retryable and attempts remain, after an exponential backoff with
jitter (``transfer.backoff_s`` doubled per attempt, capped at ``transfer.backoff_max_s``, times
0.5..1). A non-retryable error (404, 403, a changed file) is raised at once. This module does not
decide what to ask whom (``transfer.plan``) nor bound concurrency (the caller holds its slots).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cached.config import TransferConfig
from cached.errors import OriginError
from cached.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class OriginRetry:
    def __init__(self, cfg: TransferConfig, metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._rng = rng or random.Random()

    def backoff_s(self, attempt: int) -> float:
        base = min(self._cfg.backoff_max_s, self._cfg.backoff_s * (2**attempt))
        return base * (0.5 + self._rng.random() / 2)

    async def call(self, request: Callable[[], Awaitable[T]], *, what: str, retries: int | None = None) -> T:
        """``request()``, again after each retryable OriginError, at most ``retries`` more times
        (default ``transfer.retries``). ``what`` names the request in the log line
        (``read piece=12``)."""
        limit = self._cfg.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return await request()
            except OriginError as e:
                self._metrics.origin_errors.labels(error_kind(e)).inc()
                if not e.retryable or attempt >= limit:
                    raise
                delay = self.backoff_s(attempt)
                log.warning("origin %s failed, retrying attempt=%d in=%.1fs error=%s", what, attempt + 1, delay, e)
                await asyncio.sleep(delay)
                attempt += 1


def error_kind(e: OriginError) -> str:
    """The ``kind`` label of ``cached_origin_errors_total``."""
    if e.status is None:
        return "connection" if e.retryable else "other"
    if e.status >= 500:
        return "5xx"
    if e.status == 429:
        return "throttled"
    return "4xx" if e.status >= 400 else "other"
