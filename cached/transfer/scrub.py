"""Bit rot: re-hash every stored blob, paced, once per ``store.scrub_interval_s``; repair and count.

The work is ``ModelFetcher.verify`` (bad pieces re-fetched from peers or the origin, checked
against the digests recorded when each blob was made); this module only runs it on a timer at
``store.scrub_rate_bps``. A failed pass is logged and the next one tries again.
"""

from __future__ import annotations

import asyncio
import logging

from cached.errors import CachedError
from cached.periodic import every
from cached.transfer.model import ModelFetcher

log = logging.getLogger(__name__)


class Scrub:
    def __init__(self, fetcher: ModelFetcher, *, interval_s: float, rate_bps: int) -> None:
        self._fetcher = fetcher
        self._interval_s = interval_s
        self._rate_bps = rate_bps

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self._interval_s, stopping, self.once)

    async def once(self) -> None:
        try:
            report = await self._fetcher.verify(rate_bps=self._rate_bps)
        except CachedError as e:
            log.warning("scrub failed error=%s", e)
            return
        log.info(
            "scrub done checked_bytes=%d bad_pieces=%d repaired_blobs=%d errors=%d",
            report.checked_bytes,
            report.bad_pieces,
            report.repaired_blobs,
            len(report.errors),
        )
