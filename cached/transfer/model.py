"""Turns a ref into a published model: resolve, reserve space, fetch each blob, commit.

Names come from origins, bytes may come from peers: the origin always lists a ref's files (only
with ``cluster.names_from_peers`` and the origin unreachable does a peer's manifest do it), a
peer's manifest lends its blob ids only where it agrees with that listing file by file, every
address and identity is rebuilt from the ref (``Origin.file_for``), and bytes that came whole from
peers still answer to the origin's own checksum. The manifest committed is always built here.

Also verifies stored blobs and repairs bad pieces from the origin, checked against the digests
recorded when the blob was first made. A fetch that fails for lack of space leaves no partial files
behind; one that fails on the network keeps its verified pieces for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cached.errors import CachedError, IntegrityError, OriginError, StoreError, StoreFullError
from cached.metrics import Metrics
from cached.origins import Origin, Origins, Resolution
from cached.peers.client import PeerError
from cached.store import ModelRecord, Reservation, Store
from cached.transfer.blob import BlobFetcher, first_error
from cached.transfer.plan import ORIGIN
from cached.transfer.sources import PeerDirectory, Swarm, unless_suspect
from cached.transfer.wants import Wants
from cached.types import BlobId, FileEntry, Manifest, ModelRef, OriginFile, RefKind

log = logging.getLogger(__name__)

PEER = "peer"  # the source name the blob fetcher counts peer bytes under

FILES_AT_ONCE = 4
RESOLVE_RETRIES = 2  # a listing is small: fail fast rather than keep a launcher waiting


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
        self,
        store: Store,
        origins: Origins,
        blobs: BlobFetcher,
        metrics: Metrics,
        *,
        peers: PeerDirectory | None = None,
        wants: Wants | None = None,
        stall_timeout_s: float = 10.0,
        names_from_peers: bool = False,
    ) -> None:
        self._names_from_peers = names_from_peers  # trust every token holder for names when the origin is down
        self._stall_timeout_s = stall_timeout_s
        self._peers = peers
        self._wants = wants  # who else wants the same file: origin single-flight (transfer.wants)
        self._store = store
        self._origins = origins
        self._blobs = blobs
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
        return await self._blobs.retry.call(
            lambda: origin.resolve(ref), what=f"resolve ref={ref}", retries=RESOLVE_RETRIES
        )

    async def fetch(self, ref: ModelRef, progress: Progress, *, refresh: bool = False) -> ModelRecord:
        """Make ``ref`` ready. ``refresh`` re-resolves a ready ref (a moved branch) and fetches
        only the files that changed; the switch to the new revision is one atomic ref write."""
        existing = self._store.model(ref)
        if existing is not None and not refresh:
            await self._store.touch(ref)
            progress.bytes_total = progress.bytes_done = existing.manifest.total_bytes
            return existing
        origin = self._origins.for_ref(ref)
        resolution, known, piece_size = await self._names(ref, origin)
        if (
            existing is not None
            and resolution.revision is not None
            and resolution.revision == existing.manifest.revision
            # A copy holding only part of what the origin lists (a model pulled file by file
            # through /hf) is not current: the rest is fetched.
            and {f.path for f in resolution.files} <= {f.path for f in existing.manifest.files}
        ):
            await self._store.touch(ref)
            progress.bytes_total = progress.bytes_done = existing.manifest.total_bytes
            return existing
        progress.bytes_total = sum(f.size for f in resolution.files)

        have: dict[str, str] = {}
        need: list[OriginFile] = []
        for f in resolution.files:
            # Only a blob this node made from this very origin file: a blob id a peer names for a
            # path proves nothing about which file's bytes it holds.
            blob = self._store.blob_for_identity(f.key)
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
        # file:// is local: its bytes are read from this node's disk, never asked of peers.
        use_peers = self._peers is not None and ref.kind is not RefKind.FILE

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
                job = _FileJob(f, piece_size, known.get(f.path), reservation, progress)
                try:
                    blob_id = await self._fetch_file(job, origin, peers=use_peers)
                except IntegrityError as e:
                    if not job.peer_bytes:
                        raise
                    # Pieces matched the table of the blob a peer named, but the whole file is
                    # not what the origin says it is: the peer lied about the bytes. Once more,
                    # from the origin alone.
                    self._metrics.peer_content_rejected.inc()
                    log.warning(
                        "bytes from peers refused by the origin's checksum; fetching from the origin ref=%s path=%s error=%s",
                        ref,
                        f.path,
                        e,
                    )
                    job = _FileJob(f, piece_size, None, reservation, progress)
                    blob_id = await self._fetch_file(job, origin, peers=False)
                self._store.hold_blob(blob_id.hex)
                fetched[f.path] = blob_id

        try:
            try:
                # The first file that fails cancels the others; the group awaits them all.
                async with asyncio.TaskGroup() as group:
                    for f in need:
                        group.create_task(one(f), name=f"file:{f.path}")
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            entries = []
            for f in resolution.files:
                blob = BlobId(have[f.path]) if f.path in have else fetched[f.path]
                entries.append(FileEntry(path=f.path, size=f.size, blob=blob, origin=_origin_meta(f)))
            # Always built here, from the origin's answer: a peer's manifest only ever lent blob ids.
            manifest = Manifest(
                ref=ref.canonical, revision=resolution.revision, piece_size=piece_size, files=tuple(entries)
            )
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

    async def _fetch_file(self, job: _FileJob, origin: Origin, *, peers: bool) -> BlobId:
        """One origin file into a blob, pieces from peers when ``peers``. On an IntegrityError
        nothing of it is kept and what it added to the progress is taken back."""
        f, progress = job.file, job.progress
        counted: Counter[str] = Counter()
        resumed = 0

        def on_bytes(source: str, n: int) -> None:
            counted[source] += n
            progress.add(source, n)

        try:
            async with self._store.partial(
                key=f.key, size=f.size, piece_size=job.piece_size, identity_key=f.key, reservation=job.reservation
            ) as partial:
                resumed = partial.bytes_done
                progress.bytes_done += resumed
                progress.resumed += resumed
                swarm = None
                if peers and self._peers is not None:
                    swarm = Swarm(
                        self._peers,
                        key=f.key,
                        piece_size=job.piece_size,
                        size=f.size,
                        wants=self._wants,
                        stall_timeout_s=self._stall_timeout_s,
                    )
                    swarm.blob_hex = job.blob_hex
                try:
                    if swarm is not None:
                        await swarm.join(held=list(partial.done))
                    try:
                        await self._blobs.fetch_blob(partial, f, origin, on_bytes=on_bytes, swarm=swarm)
                    finally:
                        if swarm is not None:
                            await swarm.leave(held=list(partial.done))
                    job.peer_bytes = counted[PEER] > 0 or job.blob_hex is not None
                    if (
                        job.blob_hex is not None
                        and BlobId.compute(
                            partial.size, partial.piece_size, [partial.done[i] for i in range(partial.pieces)]
                        ).hex
                        != job.blob_hex
                    ):
                        raise IntegrityError(
                            f"{f.path}: the assembled blob does not match the id in the peer's manifest"
                        )
                    if swarm is not None and swarm.table is not None and not counted[ORIGIN]:
                        # The blob fetcher trusts a file that came whole from peers once every piece
                        # matched the peer's piece table; that table is the peer's word. The
                        # origin's own checksum (hf: sha256 / git sha1) is what names the bytes.
                        await origin.check_content(f, partial.data_path)
                except IntegrityError:
                    # Every piece matched its own digest but the whole file does not match the
                    # origin's checksum: no piece can be trusted, so none is kept.
                    self._metrics.piece_verify_failures.labels("origin").inc()
                    await self._store.discard_partial(partial.key)
                    raise
                return await self._store.finalize(partial)
        except IntegrityError:
            progress.bytes_done -= resumed + sum(counted.values())
            progress.resumed -= resumed
            progress.sources.subtract(counted)
            raise

    async def _names(self, ref: ModelRef, origin: Origin) -> tuple[Resolution, dict[str, str], int]:
        """(the files, path -> blob id a peer lent, piece size). The origin names the files;
        a peer's manifest lends its blob ids (so pieces come from peers) only where it agrees
        with the origin file by file. Only with ``names_from_peers`` and the origin unreachable
        does a peer's manifest name the files, and even then the addresses come from the ref."""
        piece_size = self._store.cfg.piece_size_bytes
        try:
            resolution = await self.resolve(ref)
        except OriginError as e:
            if not (self._names_from_peers and e.retryable and ref.kind is not RefKind.FILE):
                raise
            found = await self._manifest_from_peers(ref)
            if found is None:
                raise
            node_id, hint = found
            log.warning(
                "origin unreachable: files named by a peer's manifest (cluster.names_from_peers) ref=%s peer=%s error=%s",
                ref,
                node_id,
                e,
            )
            files = [await origin.file_for(ref, hint.revision, x.path, x.size, _checksums(x)) for x in hint.files]
            return (
                Resolution(files=tuple(files), revision=hint.revision),
                {x.path: x.blob.hex for x in hint.files},
                hint.piece_size,
            )
        found = await self._manifest_from_peers(ref) if ref.kind is not RefKind.FILE else None
        if found is None:
            return resolution, {}, piece_size
        node_id, hint = found
        why = _disagreement(resolution, hint)
        if why is not None:
            self._metrics.peer_manifest_rejected.inc()
            log.warning("a peer's manifest disagrees with the origin; ignored ref=%s peer=%s why=%s", ref, node_id, why)
            return resolution, {}, piece_size
        return resolution, {x.path: x.blob.hex for x in hint.files}, hint.piece_size

    async def _manifest_from_peers(self, ref: ModelRef) -> tuple[str, Manifest] | None:
        """(node id, manifest) of a live peer holding ``ref``, checked against the digest that
        peer announced -- which proves only that it is the peer's manifest."""
        if self._peers is None or ref.kind is RefKind.FILE:
            return None
        alive = dict(self._peers.alive())
        suspect = self._peers.suspect()
        for node_id, digest in sorted(self._peers.view.with_ref(ref.canonical), key=lambda nd: nd[0] in suspect):
            if node_id not in alive:
                continue
            local = self._store.manifest(digest)
            if local is not None and local.ref == ref.canonical:
                return node_id, local  # the same manifest is here already: no need to ask
            try:
                data = await unless_suspect(self._peers, node_id, self._peers.client.manifest(alive[node_id], digest))
                manifest = Manifest.from_bytes(data, expect_digest=digest)
            except (PeerError, IntegrityError) as e:
                log.warning("manifest from peer refused peer=%s ref=%s error=%s", node_id, ref, e)
                continue
            if manifest.ref == ref.canonical:
                return node_id, manifest
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
                log.error(
                    "model withdrawn: a corrupt blob could not be repaired ref=%s blob=blake3:%s error=%s",
                    ref,
                    blob_hex,
                    why,
                )
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
        origin = self._origins.for_ref(ref)
        record = self._store.model(ref)
        revision = record.manifest.revision if record is not None else None
        # The address comes from the ref, not from the stored manifest's ``locator``.
        ofile = await origin.file_for(ref, revision, entry.path, entry.size, _checksums(entry))
        bad_set = set(bad)
        async with self._store.partial(
            key=blob_hex, size=entry.size, piece_size=piece_size, identity_key=ofile.key
        ) as partial:
            for i in range(partial.pieces):
                if i in bad_set or i in partial.done:
                    continue
                data = await self._store.read_piece(blob_hex, i, piece_size)
                await asyncio.to_thread(partial.write_piece_sync, i, data, digests[i])
            swarm = None
            if self._peers is not None:
                swarm = Swarm(self._peers, key=ofile.key, piece_size=piece_size, size=entry.size)
                swarm.blob_hex, swarm.table = blob_hex, digests
            await self._blobs.fetch_blob(
                partial, ofile, origin, on_bytes=lambda s, n: None, expected=digests, swarm=swarm
            )
            await self._store.finalize(partial, replace=True)
        await self._store.rebuild_views_for_blob(blob_hex)
        log.info("repaired blob blob=blake3:%s pieces=%d ref=%s", blob_hex, len(bad), ref)


def _origin_meta(f: OriginFile) -> dict[str, str]:
    return {"identity": f.identity, "locator": f.locator, **f.checksums}


def _checksums(entry: FileEntry) -> dict[str, str]:
    """The content facts of a manifest entry; its address and identity are never reused."""
    return {k: str(v) for k, v in entry.origin.items() if k not in ("identity", "locator")}


def _disagreement(resolution: Resolution, hint: Manifest) -> str | None:
    """Why a peer's manifest does not describe what the origin just listed (None: it does)."""
    if hint.revision != resolution.revision:
        return f"revision {hint.revision} but the origin has {resolution.revision}"
    theirs = {x.path: x for x in hint.files}
    if set(theirs) != {f.path for f in resolution.files}:
        return "a different list of files"
    for f in resolution.files:
        x = theirs[f.path]
        if x.size != f.size:
            return f"{f.path}: size {x.size} but the origin has {f.size}"
        if x.origin.get("identity") != f.identity:
            return f"{f.path}: identity differs from the origin's"
        for k, v in f.checksums.items():
            if x.origin.get(k) != v:
                return f"{f.path}: {k} differs from the origin's"
    return None


@dataclass(slots=True)
class _FileJob:
    """One origin file being fetched, and whether any of its bytes came from peers."""

    file: OriginFile
    piece_size: int
    blob_hex: str | None  # the blob id an agreeing peer manifest gives for it
    reservation: Reservation
    progress: Progress
    peer_bytes: bool = False
