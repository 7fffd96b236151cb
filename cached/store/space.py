"""Space: capacity, reservations, what may not be evicted, and running eviction plans and gc.

Bytes used are blobs plus partial files; bytes reserved are promised to fetches whose partial
files do not exist yet. A ref is protected while pinned, leased, busy (a job works on it) or
protected by the cluster (a ``Protector``); a blob a running fetch holds (``hold_blob``) counts
as held by a model nothing may evict. Planning is ``eviction.plan_eviction`` (pure); this module
runs the plan through the store's own removal, which keeps the deletion order (views, ref,
manifest, blobs). It does not decide which node should hold what (``cached.cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cached.config import StoreConfig
from cached.errors import StoreFullError
from cached.store.claims import Claims
from cached.store.eviction import Debris, EvictionPlan, ModelUsage, plan_eviction, reclaimable_bytes
from cached.store.index import Index
from cached.store.protection import Protector
from cached.types import ModelRef, format_size

log = logging.getLogger(__name__)


class Removal(Protocol):
    """What eviction needs of the store: its removals, in their crash-safe order."""

    def is_open_partial(self, key: str) -> bool: ...

    async def remove_blob_if_unused(self, blob_hex: str) -> int: ...

    async def discard_partial(self, key: str) -> None: ...

    async def remove_model(self, ref: ModelRef) -> int: ...


class Reservation:
    """Space promised to a fetch before its partial files exist; shrinks as they are created."""

    def __init__(self, space: Space, nbytes: int, evicted: list[str] | None = None) -> None:
        self._space = space
        self.remaining = nbytes
        self.evicted = evicted or []  # models evicted to make room for it

    def consume(self, nbytes: int) -> None:
        self.remaining = max(0, self.remaining - nbytes)

    def release(self) -> None:
        self._space._reservations.discard(self)


class Space:
    def __init__(
        self,
        cfg: StoreConfig,
        *,
        root: Path,
        index: Index,
        claims: Claims,
        removal: Removal,
        protector: Protector | None = None,
    ) -> None:
        self._cfg = cfg
        self._root = root  # cfg.cache_dir at start: a reload does not move the store
        self._index = index
        self._claims = claims
        self._removal = removal
        self._busy: Counter[str] = Counter()  # refs a job is working on: never evicted
        self._reservations: set[Reservation] = set()
        # Blobs finalized by a running fetch whose manifest is not published yet: not debris.
        self._pending: Counter[str] = Counter()
        self._evict_lock = asyncio.Lock()
        self.capacity_bytes = 0
        self._protector = protector  # the cluster's say on what must stay (cached.cluster.ReplicaGuard)

    def load_sync(self) -> None:
        self.capacity_bytes = self._capacity()

    def reconfigure(self, cfg: StoreConfig) -> None:
        self._cfg = cfg
        self.capacity_bytes = self._capacity()

    def _capacity(self) -> int:
        if self._cfg.max_bytes:
            return self._cfg.max_bytes
        st = os.statvfs(self._root)
        return int(st.f_blocks * st.f_frsize * 0.9)

    @property
    def used_bytes(self) -> int:
        return sum(self._index.blobs.values()) + sum(self._index.partial_sizes.values())

    @property
    def reserved_bytes(self) -> int:
        return sum(r.remaining for r in self._reservations)

    # --- protection ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def busy(self, ref: ModelRef) -> Iterator[None]:
        """Mark a ref as being worked on (fetch, repair): eviction leaves it alone meanwhile."""
        self._busy[ref.canonical] += 1
        try:
            yield
        finally:
            self._busy[ref.canonical] -= 1
            if not self._busy[ref.canonical]:
                del self._busy[ref.canonical]

    def is_protected(self, ref: str) -> bool:
        return (
            self._claims.is_pinned(ref)
            or bool(self._claims.leases_for(ref))
            or ref in self._busy
            or (self._protector is not None and self._protector.protects(ref))
        )

    def hold_blob(self, blob_hex: str) -> None:
        self._pending[blob_hex] += 1

    def unhold_blob(self, blob_hex: str) -> None:
        if self._pending[blob_hex] > 0:
            self._pending[blob_hex] -= 1
        if not self._pending[blob_hex]:
            del self._pending[blob_hex]

    def is_held(self, blob_hex: str) -> bool:
        return blob_hex in self._pending

    # --- eviction ------------------------------------------------------------------------------

    def _usage(self) -> tuple[list[ModelUsage], list[Debris]]:
        index = self._index
        models = [
            ModelUsage(
                ref=canonical,
                last_used=last_used,
                blobs=frozenset(f.blob.hex for f in index.manifests[digest].files),
                protected=self.is_protected(canonical),
            )
            for canonical, (digest, last_used) in index.refs.items()
        ]
        if self._pending:
            # Blobs a running fetch holds count as held by a model nothing may evict.
            models.append(ModelUsage(ref="", last_used=0.0, blobs=frozenset(self._pending), protected=True))
        in_use = index.blobs_in_use()
        debris = [
            Debris(kind="blob", key=b, size=s)
            for b, s in index.blobs.items()
            if b not in in_use and b not in self._pending
        ]
        debris += [
            Debris(kind="partial", key=k, size=s)
            for k, s in index.partial_sizes.items()
            if not self._removal.is_open_partial(k)
        ]
        return models, debris

    def eviction_plan(self, target_bytes: int) -> EvictionPlan:
        """What eviction would remove to bring usage (with reservations) down to ``target_bytes``."""
        models, debris = self._usage()
        return plan_eviction(
            models=models,
            blob_sizes=self._index.blobs,
            debris=debris,
            used_bytes=self.used_bytes + self.reserved_bytes,
            target_bytes=target_bytes,
        )

    async def evict_to(self, target_bytes: int) -> tuple[int, list[str]]:
        """Run one eviction plan down to ``target_bytes``. Returns (bytes freed, refs evicted)."""
        async with self._evict_lock:
            plan = self.eviction_plan(target_bytes)
            freed = 0
            for d in plan.debris:
                if d.kind == "blob":
                    freed += await self._removal.remove_blob_if_unused(d.key)
                elif d.kind == "partial" and not self._removal.is_open_partial(d.key):
                    await self._removal.discard_partial(d.key)
                    freed += d.size
            evicted = []
            for canonical in plan.models:
                if canonical in self._index.refs and not self.is_protected(canonical):
                    freed += await self._removal.remove_model(ModelRef.parse(canonical))
                    evicted.append(canonical)
                    log.info("evicted model ref=%s", canonical)
            return freed, evicted

    async def gc(self) -> tuple[int, list[str]]:
        """Bring usage under the low watermark if it is above the high one; always drop debris."""
        freed, evicted = 0, []
        if self.used_bytes > self.capacity_bytes * self._cfg.high_watermark:
            freed, evicted = await self.evict_to(int(self.capacity_bytes * self._cfg.low_watermark))
        _, debris = self._usage()
        for d in debris:
            if d.kind == "blob":
                freed += await self._removal.remove_blob_if_unused(d.key)
        return freed, evicted

    async def reserve(self, nbytes: int) -> Reservation:
        """Promise ``nbytes`` to a fetch, evicting LRU models if needed; StoreFullError if impossible."""
        limit = self.capacity_bytes - nbytes
        over = self.used_bytes + self.reserved_bytes - limit
        # The filesystem may hold less than the capacity says (max_bytes above the disk size, a
        # disk shared with other data): what it lacks must be freed too.
        st = await asyncio.to_thread(os.statvfs, self._root)
        over = max(over, nbytes + self.reserved_bytes - st.f_bavail * st.f_frsize)
        evicted: list[str] = []
        # Evict only when that can make the fetch fit: a model that can never fit must not
        # empty the cache on its way to failing.
        if over > 0 and over <= self.reclaimable():
            _, evicted = await self.evict_to(self.used_bytes + self.reserved_bytes - over)
        if self.used_bytes + self.reserved_bytes > limit:
            free = self.capacity_bytes - self.used_bytes - self.reserved_bytes
            raise StoreFullError(
                f"not enough cache space: needs {format_size(nbytes)}, {format_size(max(0, free))} free of "
                f"{format_size(self.capacity_bytes)} after evicting everything evictable "
                f"(pinned, leased and in-use models are kept)",
                needed_bytes=nbytes,
                available_bytes=max(0, free),
            )
        r = Reservation(self, nbytes, evicted)
        self._reservations.add(r)
        return r

    def reclaimable(self) -> int:
        models, debris = self._usage()
        return reclaimable_bytes(models=models, blob_sizes=self._index.blobs, debris=debris)
