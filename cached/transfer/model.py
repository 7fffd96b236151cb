"""Turns a ref into a published model: resolve, reserve space, fetch each blob, commit.

Also verifies stored blobs and repairs bad pieces from the origin, checked against the digests
recorded when the blob was first made. A fetch that fails for lack of space leaves no partial files
behind; one that fails on the network keeps its verified pieces for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

from cached.errors import CachedError, IntegrityError, OriginError, StoreError, StoreFullError
from cached.metrics import Metrics
from cached.origins import Origins, Resolution
from cached.peers.client import PeerError
from cached.store import ModelRecord, Store
from cached.transfer.scheduler import Scheduler, _error_kind
from cached.transfer.sources import PeerDirectory, Swarm
from cached.types import BlobId, FileEntry, Manifest, ModelRef, OriginFile

log = logging.getLogger(__name__)

FILES_AT_ONCE = 4


@dataclass(slots=True)
class Progress:
    """Live figures of one fetch, written by the fetcher, read by jobs and the API."""

    bytes_total: int = 0
    bytes_done: int = 0
    resumed: int = 0  # bytes already on disk when the fetch started (not fetched now)
    sources: Counter[str] = field(default_factory=Counter)
    partial_keys: list[str] = field(default_factory=list)  # so an evict can drop them

    def add(self, source: str, nbytes: int) -> None:
        self.bytes_done += nbytes
        self.sources[source] += nbytes


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    checked_bytes: int
    bad_pieces: int
    repaired_blobs: int
    errors: tuple[str, ...] = ()


class ModelFetcher:
    def __init__(
        self, store: Store, origins: Origins, scheduler: Scheduler, metrics: Metrics, *,
        peers: PeerDirectory | None = None, grace_s: float = 0.0, stall_timeout_s: float = 10.0,
    ) -> None:
        self._stall_timeout_s = stall_timeout_s
        self._peers = peers
        self._grace_s = grace_s  # how long a new fetch waits to learn who else wants the same file
        self._store = store
        self._origins = origins
        self._scheduler = scheduler
        self._metrics = metrics
        self._key_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        """One fetch per origin file at a time, even across refs that name the same file."""
        lock, users = self._key_locks.get(key, (asyncio.Lock(), 0))
        self._key_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._key_locks[key]
            if users <= 1:
                del self._key_locks[key]
            else:
                self._key_locks[key] = (lock, users - 1)

    async def resolve(self, ref: ModelRef) -> Resolution:
        origin = self._origins.for_ref(ref)
        attempt = 0
        while True:
            try:
                return await origin.resolve(ref)
            except OriginError as e:
                self._metrics.origin_errors.labels(_error_kind(e)).inc()
                if not e.retryable or attempt >= 2:
                    raise
                await asyncio.sleep(self._scheduler.backoff_s(attempt))
                attempt += 1

    async def fetch(self, ref: ModelRef, progress: Progress, *, refresh: bool = False) -> ModelRecord:
        """Make ``ref`` ready. ``refresh`` re-resolves a ready ref (a moved branch) and fetches
        only the files that changed; the switch to the new revision is one atomic ref write."""
        existing = self._store.model(ref)
        if existing is not None and not refresh:
            await self._store.touch(ref)
            progress.bytes_total = progress.bytes_done = existing.manifest.total_bytes
            return existing
        origin = self._origins.for_ref(ref)
        # A ref some peer already resolved is taken from the peer (verified by digest): the
        # origin is not asked at all. --refresh always asks the origin.
        from_peer = None if refresh else await self._manifest_from_peers(ref)
        known: dict[str, str] = {}  # path -> blob hex, when a peer's manifest names it
        if from_peer is not None:
            resolution = Resolution(files=tuple(_origin_file(e) for e in from_peer.files), revision=from_peer.revision)
            known = {e.path: e.blob.hex for e in from_peer.files}
            piece_size = from_peer.piece_size  # the same piece size, or the blob ids would differ
        else:
            resolution = await self.resolve(ref)
            piece_size = self._store.cfg.piece_size_bytes
        if existing is not None and resolution.revision is not None and resolution.revision == existing.manifest.revision:
            await self._store.touch(ref)
            progress.bytes_total = progress.bytes_done = existing.manifest.total_bytes
            return existing
        progress.bytes_total = sum(f.size for f in resolution.files)

        have: dict[str, str] = {}
        need: list[OriginFile] = []
        for f in resolution.files:
            blob = known[f.path] if self._store.has_blob(known.get(f.path, "")) else self._store.blob_for_identity(f.key)
            if blob is not None:
                have[f.path] = blob
                self._store.hold_blob(blob)
            else:
                need.append(f)
        progress.bytes_done = progress.resumed = sum(f.size for f in resolution.files if f.path in have)

        progress.partial_keys = [f.key for f in need]
        reservation = await self._store.reserve(sum(f.size for f in need if not self._store.has_partial(f.key)))
        self._metrics.evictions.inc(len(reservation.evicted))
        fetched: dict[str, BlobId] = {}
        sem = asyncio.Semaphore(FILES_AT_ONCE)

        async def one(f: OriginFile) -> None:
            async with sem, self._key_lock(f.key):
                # Another job may have finished this very file while we waited for the lock.
                done = self._store.blob_for_identity(f.key)
                if done is not None:
                    self._store.hold_blob(done)
                    fetched[f.path] = BlobId(done)
                    progress.bytes_done += f.size
                    progress.resumed += f.size
                    return
                async with self._store.partial(
                    key=f.key, size=f.size, piece_size=piece_size, identity_key=f.key, reservation=reservation
                ) as partial:
                    progress.bytes_done += partial.bytes_done
                    progress.resumed += partial.bytes_done
                    swarm = None
                    if self._peers is not None:
                        swarm = Swarm(
                            self._peers, key=f.key, piece_size=piece_size, size=f.size, grace_s=self._grace_s,
                            stall_timeout_s=self._stall_timeout_s,
                        )
                        swarm.blob_hex = known.get(f.path)
                    try:
                        await self._scheduler.fetch_blob(partial, f, origin, on_bytes=progress.add, swarm=swarm)
                        if f.path in known and BlobId.compute(partial.size, partial.piece_size, [partial.done[i] for i in range(partial.pieces)]).hex != known[f.path]:
                            raise IntegrityError(f"{f.path}: the assembled blob does not match the id in the peer's manifest")
                    except IntegrityError:
                        # Every piece matched its own digest but the whole file does not match the
                        # origin's checksum: no piece can be trusted, so none is kept.
                        self._metrics.piece_verify_failures.labels("origin").inc()
                        await self._store.discard_partial(partial.key)
                        raise
                    blob_id = await self._store.finalize(partial)
                self._store.hold_blob(blob_id.hex)
                fetched[f.path] = blob_id

        try:
            tasks = [asyncio.create_task(one(f), name=f"file:{f.path}") for f in need]
            try:
                for t in asyncio.as_completed(tasks):
                    await t
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            entries = []
            for f in resolution.files:
                blob = BlobId(have[f.path]) if f.path in have else fetched[f.path]
                entries.append(FileEntry(path=f.path, size=f.size, blob=blob, origin=_origin_meta(f)))
            manifest = from_peer or Manifest(ref=ref.canonical, revision=resolution.revision, piece_size=piece_size, files=tuple(entries))
            return await self._store.commit_model(ref, manifest, sources=dict(progress.sources))
        except StoreFullError:
            # The promise: a prefetch that cannot fit leaves no partial files behind.
            for f in need:
                await self._store.discard_partial(f.key)
            raise
        finally:
            reservation.release()
            for blob in list(have.values()) + [b.hex for b in fetched.values()]:
                self._store.unhold_blob(blob)

    async def _manifest_from_peers(self, ref: ModelRef) -> Manifest | None:
        if self._peers is None:
            return None
        alive = dict(self._peers.alive())
        suspect = self._peers.suspect()
        for node_id, digest in sorted(self._peers.view.with_ref(ref.canonical), key=lambda nd: nd[0] in suspect):
            if node_id not in alive:
                continue
            local = self._store.manifest(digest)
            if local is not None:
                return local
            try:
                data = await self._peers.client.manifest(alive[node_id], digest)
                manifest = Manifest.from_bytes(data, expect_digest=digest)
            except (PeerError, IntegrityError) as e:
                log.warning("manifest from peer refused peer=%s ref=%s error=%s", node_id, ref, e)
                continue
            if manifest.ref == ref.canonical:
                log.info("resolved from peer ref=%s peer=%s manifest=blake3:%s", ref, node_id, digest)
                return manifest
        return None

    # --- verify and repair ---------------------------------------------------------------------

    async def verify(self, ref: ModelRef | None = None, *, rate_bps: int = 0) -> VerifyReport:
        """Re-hash stored blobs (of ``ref``, or all); repair bad pieces from peers or the origin.
        ``rate_bps`` paces the reading (the background scrub), 0 = as fast as the disk goes."""
        records = [self._store.model(ref)] if ref is not None else self._store.models()
        blobs: dict[str, tuple[ModelRef, FileEntry]] = {}
        for rec in records:
            if rec is None:
                continue
            for f in rec.manifest.files:
                blobs.setdefault(f.blob.hex, (ModelRef.parse(rec.ref), f))
        checked = bad_total = repaired = 0
        errors: list[str] = []
        for blob_hex, (owner, entry) in blobs.items():
            if not self._store.has_blob(blob_hex):
                continue  # evicted while we were scrubbing others
            with self._store.busy(owner):
                n, bad = await self._store.verify_blob(blob_hex)
                checked += n
                if rate_bps > 0:
                    await asyncio.sleep(n / rate_bps)
                if not bad:
                    continue
                bad_total += len(bad)
                self._metrics.bad_pieces_found.inc(len(bad))
                log.warning("bad pieces found blob=blake3:%s pieces=%s ref=%s", blob_hex, bad[:10], owner)
                try:
                    await self.repair_blob(owner, entry, bad)
                    repaired += 1
                except (OriginError, StoreError, PeerError) as e:
                    errors.append(f"{owner} {entry.path}: {e}")
                    await self._withdraw(blob_hex, str(e))
        return VerifyReport(checked_bytes=checked, bad_pieces=bad_total, repaired_blobs=repaired, errors=tuple(errors))

    async def _withdraw(self, blob_hex: str, why: str) -> None:
        """A blob known bad and not repairable must not be served: its models go (a later
        prefetch fetches them again)."""
        for rec in self._store.models():
            if any(f.blob.hex == blob_hex for f in rec.manifest.files):
                ref = ModelRef.parse(rec.ref)
                log.error("model withdrawn: a corrupt blob could not be repaired ref=%s blob=blake3:%s error=%s", ref, blob_hex, why)
                with contextlib.suppress(CachedError):
                    await self._store.remove_model(ref)
        if self._store.has_partial(blob_hex):  # the failed repair's half-built copy
            await self._store.discard_partial(blob_hex)

    async def repair_blob(self, ref: ModelRef, entry: FileEntry, bad: list[int]) -> None:
        """Rebuild a blob from its good pieces plus the bad ones, from peers that hold the blob or
        else from the origin, each checked against the digest recorded when the blob was made."""
        blob_hex = entry.blob.hex
        digests = await self._store.piece_digests(blob_hex)
        piece_size = await self._store.blob_piece_size(blob_hex)
        ofile = _origin_file(entry)
        origin = self._origins.for_ref(ref)
        bad_set = set(bad)
        async with self._store.partial(key=blob_hex, size=entry.size, piece_size=piece_size, identity_key=ofile.key) as partial:
            for i in range(partial.pieces):
                if i in bad_set or i in partial.done:
                    continue
                data = await self._store.read_piece(blob_hex, i, piece_size)
                await asyncio.to_thread(partial.write_piece_sync, i, data, digests[i])
            swarm = None
            if self._peers is not None:
                swarm = Swarm(self._peers, key=ofile.key, piece_size=piece_size, size=entry.size)
                swarm.blob_hex, swarm.table = blob_hex, digests
            await self._scheduler.fetch_blob(partial, ofile, origin, on_bytes=lambda s, n: None, expected=digests, swarm=swarm)
            await self._store.finalize(partial, replace=True)
        await self._store.rebuild_views_for_blob(blob_hex)
        log.info("repaired blob blob=blake3:%s pieces=%d ref=%s", blob_hex, len(bad), ref)


def _origin_meta(f: OriginFile) -> dict[str, str]:
    return {"identity": f.identity, "locator": f.locator, **f.checksums}


def _origin_file(entry: FileEntry) -> OriginFile:
    meta = dict(entry.origin)
    identity = meta.pop("identity", "")
    locator = meta.pop("locator", "")
    return OriginFile(path=entry.path, size=entry.size, identity=identity, checksums=meta, locator=locator)
