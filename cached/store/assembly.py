"""Blobs being assembled: one shared ``PartialBlob`` per key while any fetch has it open.

Every fetcher of one key (two jobs wanting the same origin file) joins the same object; the last
one out closes it. Opening resumes what a previous run verified. ``finalize`` publishes a complete
partial as a blob (an identical blob already present wins), ``discard`` drops one. Each change is
announced (``PartialStarted``, ``PieceVerified``, ``BlobAdded``, ``PartialDropped``) on the event
loop, pieces recorded in worker threads included. Where the bytes come from is ``cached.transfer``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from cached.store.index import Index
from cached.store.layout import Layout
from cached.store.partial import PartialBlob, PieceLogHeader
from cached.store.space import Reservation
from cached.types import BlobAdded, BlobId, PartialDropped, PartialStarted, PieceVerified, StoreEvent

log = logging.getLogger(__name__)


class Assembly:
    def __init__(self, layout: Layout, index: Index, on_event: Callable[[StoreEvent], None]) -> None:
        self._layout = layout
        self._index = index
        self._on_event = on_event
        self._open: dict[str, tuple[PartialBlob, int]] = {}  # key -> (partial, users)
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, key: str) -> PartialBlob | None:
        entry = self._open.get(key)
        return entry[0] if entry is not None else None

    def state_events(self) -> list[StoreEvent]:
        events: list[StoreEvent] = []
        for key, (partial, _) in self._open.items():
            events.append(PartialStarted(key=key, size=partial.size, piece_size=partial.piece_size))
            events += [PieceVerified(key=key, index=i, digest=d) for i, d in partial.done.items()]
        return events

    @contextlib.asynccontextmanager
    async def join(
        self,
        *,
        key: str,
        size: int,
        piece_size: int,
        identity_key: str,
        reservation: Reservation | None = None,
    ) -> AsyncIterator[PartialBlob]:
        """Open (or join) the partial blob ``key``; every user of one key shares one object."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._open.get(key)
            if entry is None:
                entry = (await self._open_partial(key, size, piece_size, identity_key, reservation), 0)
            self._open[key] = (entry[0], entry[1] + 1)
        try:
            yield entry[0]
        finally:
            partial, users = self._open[key]
            if users <= 1:
                del self._open[key]
                self._locks.pop(key, None)
                await asyncio.shield(asyncio.to_thread(partial.close_sync))
            else:
                self._open[key] = (partial, users - 1)

    async def _open_partial(
        self,
        key: str,
        size: int,
        piece_size: int,
        identity_key: str,
        reservation: Reservation | None,
    ) -> PartialBlob:
        loop = asyncio.get_running_loop()
        header = PieceLogHeader(size=size, piece_size=piece_size, identity_key=identity_key)
        partial = PartialBlob(
            key=key,
            header=header,
            data_path=self._layout.partial_path(key),
            log_path=self._layout.partial_log_path(key),
            # Pieces are recorded in worker threads; peers hear of each on the event loop.
            on_piece=lambda i, d: loop.call_soon_threadsafe(self._on_event, PieceVerified(key=key, index=i, digest=d)),
        )
        fresh = key not in self._index.partial_sizes
        opening = asyncio.ensure_future(asyncio.to_thread(partial.open_sync))
        try:
            kept = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread runs on and creates the files: let it finish, close its fds,
            # and record the files so that evict and gc can find and drop them.
            await asyncio.gather(opening, return_exceptions=True)
            if not opening.cancelled() and opening.exception() is None:
                await asyncio.to_thread(partial.close_sync)
                self._index.partial_sizes[key] = size
            raise
        if kept:
            log.info("resuming partial blob key=%s verified_pieces=%d of=%d", key[:16], kept, partial.pieces)
        if fresh and reservation is not None:
            reservation.consume(size)
        self._index.partial_sizes[key] = size
        self._on_event(PartialStarted(key=key, size=size, piece_size=piece_size))
        for index, digest in list(partial.done.items()):
            self._on_event(PieceVerified(key=key, index=index, digest=digest))
        return partial

    async def finalize(self, partial: PartialBlob, *, replace: bool = False) -> BlobId:
        """Publish a complete partial as a blob. An identical blob already present wins (dedupe)."""
        index, lay = self._index, self._layout
        digests = [partial.done[i] for i in range(partial.pieces)]
        blob_id = BlobId.compute(partial.size, partial.piece_size, digests)
        if blob_id.hex in index.blobs and not replace:
            await asyncio.to_thread(partial.discard_sync)
        else:
            await asyncio.to_thread(partial.finalize_sync, lay.blob_path(blob_id.hex), lay.sidecar_path(blob_id.hex))
            index.blobs[blob_id.hex] = partial.size
            self._on_event(BlobAdded(blob_hex=blob_id.hex, size=partial.size, identity_key=partial.header.identity_key))
        index.partial_sizes.pop(partial.key, None)
        self._on_event(PartialDropped(key=partial.key))
        if partial.header.identity_key:
            index.blob_by_identity[partial.header.identity_key] = blob_id.hex
        return blob_id

    async def discard(self, key: str) -> None:
        entry = self._open.get(key)
        if entry is not None:
            await asyncio.to_thread(entry[0].discard_sync)
        else:
            await asyncio.to_thread(_unlink_partial, self._layout, key)
        self._index.partial_sizes.pop(key, None)
        self._on_event(PartialDropped(key=key))


def _unlink_partial(layout: Layout, key: str) -> None:
    layout.partial_path(key).unlink(missing_ok=True)
    layout.partial_log_path(key).unlink(missing_ok=True)
