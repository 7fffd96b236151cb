"""The store's own upkeep, every few seconds: ended leases let go, usage brought under the watermark.

Each pass expires leases whose time is up (their holders never renewed), drops revisions nothing
holds any more, and runs ``Store.gc`` (eviction past the high watermark, debris always). One
failed pass is logged and the next one tries again. This module does not decide what may be
evicted: the store and its protector do.
"""

from __future__ import annotations

import asyncio
import logging

from cached.errors import CachedError
from cached.metrics import Metrics
from cached.periodic import every
from cached.store.store import Store

log = logging.getLogger(__name__)

INTERVAL_S = 10.0


class Housekeeping:
    def __init__(self, store: Store, metrics: Metrics, *, interval_s: float = INTERVAL_S) -> None:
        self._store = store
        self._metrics = metrics
        self._interval_s = interval_s

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self._interval_s, stopping, self.once)

    async def once(self) -> None:
        try:
            expired = await self._store.claims.expire()
            for lease in expired:
                log.info("lease expired lease=%s ref=%s holder=%s", lease.lease_id, lease.ref, lease.holder)
            if expired:
                await self._store.release_unretained()
            freed, evicted = await self._store.gc()
            if evicted:
                self._metrics.evictions.inc(len(evicted))
                log.info("evicted under pressure models=%d freed_bytes=%d", len(evicted), freed)
        except CachedError as e:
            log.warning("housekeeping failed error=%s", e)
