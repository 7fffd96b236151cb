"""The node's store: a facade over blobs, partial blobs, manifests and refs.

The filesystem is the source of truth; the in-memory index (``index``) is rebuilt by ``open``.
Publishing goes blob -> manifest -> view -> ref (last); deletion goes view -> ref -> manifest ->
blobs. A crash at any point therefore leaves either the old model or the new one, and ``open``
sweeps the debris. Every change peers may care about is announced to ``on_event`` (a
``cached.types.StoreEvent``) on the event loop, right after the index changes.

The parts: ``layout`` (paths), ``index`` (the in-memory index and the start-up sweep), ``views``
(``models/`` and ``hf/``), ``space`` (capacity, reservations, eviction, gc), ``assembly`` (the open
partial blobs), ``partial`` (one blob being assembled), ``verified`` (reading only verified
bytes), ``claims`` (pins, leases).

What this module does not do: decide where bytes come from (``cached.transfer``), run jobs
(``cached.jobs``), or decide which node should hold what (``cached.cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from cached.config import StoreConfig
from cached.errors import IntegrityError, NotFoundError, StoreError
from cached.store import durable
from cached.store.assembly import Assembly
from cached.store.claims import Claims
from cached.store.eviction import EvictionPlan
from cached.store.index import Index, ref_record
from cached.store.layout import Layout
from cached.store.partial import PartialBlob, read_piece_log
from cached.store.protection import Protector
from cached.store.pulls import Pulls
from cached.store.space import Reservation, Space
from cached.store.verified import VerifiedFile
from cached.store.views import Views, hf_repo
from cached.types import (
    DEFAULT_PIECE_SIZE,
    BlobAdded,
    BlobId,
    BlobRemoved,
    FileEntry,
    Manifest,
    ManifestAdded,
    ManifestRemoved,
    ModelRef,
    RefChanged,
    RefKind,
    StoreEvent,
    format_size,
    hash_piece,
    piece_span,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    ref: str
    manifest: Manifest
    last_used: float
    path: Path
    sources: dict[str, int]  # bytes fetched for it on this node, by source ("origin", "peer")


class Store:
    def __init__(
        self,
        cfg: StoreConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[StoreEvent], None] = lambda e: None,
        protector: Protector | None = None,
    ) -> None:
        self.cfg = cfg
        self.layout = Layout(cfg.cache_dir)
        self.root = cfg.cache_dir
        self.blobs_dir = self.layout.blobs_dir
        self.partial_dir = self.layout.partial_dir
        self.manifests_dir = self.layout.manifests_dir
        self.refs_dir = self.layout.refs_dir
        self.models_dir = self.layout.models_dir
        self.hf_dir = self.layout.hf_dir
        self.tmp_dir = self.layout.tmp_dir
        self.claims = Claims(self.layout.claims_dir, clock=clock)
        self._clock = clock
        # Told of every change peers may care about; called on the event loop only.
        self._on_event = on_event
        self._index = Index(self.layout, self.claims)
        # What /hf pulled: branch -> commit and each pulled commit's listing (``pulls``).
        self.pulls = Pulls(self.layout.pulls_dir)
        self._views = Views(self.layout, self._index, self.pulls)
        self._space = Space(
            cfg, root=self.root, index=self._index, claims=self.claims, removal=self, protector=protector
        )
        self._assembly = Assembly(self.layout, self._index, on_event)
        self.capacity_warning: str | None = None  # set by open: max_bytes above the disk's size
        self._ref_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # one commit of a ref at a time

    # --- start ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)
        self._check_capacity()
        log.info(
            "store indexed dir=%s blobs=%d models=%d partials=%d used=%s capacity=%s",
            self.root,
            len(self._index.blobs),
            len(self._index.refs),
            len(self._index.partial_sizes),
            format_size(self.used_bytes),
            format_size(self.capacity_bytes),
        )

    def _open_sync(self) -> None:
        self._index.load_sync()
        self.pulls.load_sync()
        # What /hf noted of repos this node holds nothing of (evicted, or only asked about).
        held = {views_repo for views_repo in (hf_repo(m.ref) for m in self._index.manifests.values()) if views_repo}
        self.pulls.prune_sync(held)
        self._space.load_sync()
        self._views.sweep_sync()
        if self.claims.skipped:
            self._index.bad_entries["claim"] += self.claims.skipped

    def _check_capacity(self) -> None:
        """A ``max_bytes`` above the filesystem's size is a promise the disk cannot keep: the
        store would fill the disk before it ever evicts. Warned at start and on reload, and
        shown in the node status (``capacity_warning``)."""
        self.capacity_warning = None
        try:
            fs = shutil.disk_usage(self.root).total
        except OSError:
            return
        if self.cfg.max_bytes and self.cfg.max_bytes > fs:
            self.capacity_warning = (
                f"store.max_bytes ({format_size(self.cfg.max_bytes)}) is larger than the filesystem "
                f"holding {self.root} ({format_size(fs)}): the disk fills before eviction starts"
            )
            log.warning(
                "capacity larger than the filesystem max_bytes=%d filesystem_bytes=%d dir=%s",
                self.cfg.max_bytes,
                fs,
                self.root,
            )

    @property
    def bad_entries(self) -> Counter[str]:
        """Entries found on disk at open that were skipped (each logged), by kind."""
        return self._index.bad_entries

    def reconfigure(self, cfg: StoreConfig) -> None:
        """SIGHUP: new capacity and watermarks (the directory and piece size need a restart)."""
        self.cfg = cfg
        self._space.reconfigure(cfg)
        self._check_capacity()

    def state_events(self) -> list[StoreEvent]:
        """The whole current state as events: what a listener that starts now must hear first."""
        index = self._index
        keys = {h: k for k, h in index.blob_by_identity.items()}
        events: list[StoreEvent] = [
            BlobAdded(blob_hex=h, size=size, identity_key=keys.get(h, "")) for h, size in index.blobs.items()
        ]
        events += [ManifestAdded(digest=d) for d in sorted(index.manifests)]
        events += [RefChanged(ref=canonical, digest=d) for canonical, (d, _) in sorted(index.refs.items())]
        return events + self._assembly.state_events()

    # --- paths and queries ---------------------------------------------------------------------

    def blob_path(self, blob_hex: str) -> Path:
        return self.layout.blob_path(blob_hex)

    def sidecar_path(self, blob_hex: str) -> Path:
        return self.layout.sidecar_path(blob_hex)

    def view_path(self, ref: ModelRef) -> Path:
        return self.layout.view_path(ref)

    def manifest_path(self, digest: str) -> Path:
        return self.layout.manifest_path(digest)

    def has_blob(self, blob_hex: str) -> bool:
        return blob_hex in self._index.blobs

    def blob_size(self, blob_hex: str) -> int | None:
        return self._index.blobs.get(blob_hex)

    def blob_count(self) -> int:
        return len(self._index.blobs)

    def blob_for_identity(self, identity_key: str) -> str | None:
        hex_ = self._index.blob_by_identity.get(identity_key)
        return hex_ if hex_ in self._index.blobs else None

    def has_partial(self, key: str) -> bool:
        return key in self._index.partial_sizes

    def open_partial(self, key: str) -> PartialBlob | None:
        """The in-progress partial of ``key`` if a fetch has it open (to stream verified pieces)."""
        return self._assembly.get(key)

    def is_open_partial(self, key: str) -> bool:
        return self._assembly.get(key) is not None

    def manifest(self, digest: str) -> Manifest | None:
        return self._index.manifests.get(digest)

    def ref_digest(self, ref: ModelRef) -> str | None:
        entry = self._index.refs.get(ref.canonical)
        return entry[0] if entry else None

    def model(self, ref: ModelRef) -> ModelRecord | None:
        entry = self._index.refs.get(ref.canonical)
        if entry is None:
            return None
        digest, last_used = entry
        return ModelRecord(
            ref=ref.canonical,
            manifest=self._index.manifests[digest],
            last_used=last_used,
            path=self.view_path(ref),
            sources=dict(self._index.sources.get(ref.canonical, {})),
        )

    def models(self) -> list[ModelRecord]:
        out = []
        for canonical in sorted(self._index.refs):
            rec = self.model(ModelRef.parse(canonical))
            if rec is not None:
                out.append(rec)
        return out

    def hf_snapshot(self, manifest: Manifest) -> Path | None:
        """``hf/models--org--name/snapshots/<commit>``: a per-commit path that outlives a refresh."""
        return self._views.hf_snapshot(manifest)

    def retained_digests(self) -> set[str]:
        """Manifests kept alive by a lease even after their ref moved on (staged rollover)."""
        return self._index.retained_digests()

    def retained_for(self, ref: ModelRef) -> list[Manifest]:
        """Older revisions of ``ref`` still held by leases."""
        manifests = self._index.manifests
        current = self._index.refs.get(ref.canonical, ("", 0.0))[0]
        return [
            manifests[d]
            for d in sorted(self.retained_digests())
            if d in manifests and d != current and manifests[d].ref == ref.canonical
        ]

    async def touch(self, ref: ModelRef) -> None:
        entry = self._index.refs.get(ref.canonical)
        if entry is None:
            return
        now = self._clock()
        self._index.refs[ref.canonical] = (entry[0], now)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.utime, self.layout.ref_path(ref), (now, now))

    # --- partial blobs (``assembly``) ----------------------------------------------------------

    def partial(
        self,
        *,
        key: str,
        size: int,
        piece_size: int,
        identity_key: str,
        reservation: Reservation | None = None,
    ) -> contextlib.AbstractAsyncContextManager[PartialBlob]:
        """Open (or join) the partial blob ``key``; every user of one key shares one object."""
        return self._assembly.join(
            key=key, size=size, piece_size=piece_size, identity_key=identity_key, reservation=reservation
        )

    async def finalize(self, partial: PartialBlob, *, replace: bool = False) -> BlobId:
        """Publish a complete partial as a blob. An identical blob already present wins (dedupe)."""
        return await self._assembly.finalize(partial, replace=replace)

    async def discard_partial(self, key: str) -> None:
        await self._assembly.discard(key)

    # --- reading verified bytes ----------------------------------------------------------------

    async def open_verified(
        self, *, blob_hex: str | None = None, partial_key: str | None = None
    ) -> VerifiedFile | None:
        """The complete blob ``blob_hex``, or the partial ``partial_key`` a fetch has open, for
        reading only its verified bytes; None if this node has neither (any more)."""
        if blob_hex is not None:
            size = self._index.blobs.get(blob_hex)
            if size is None:
                return None
            try:
                fd = await asyncio.to_thread(os.open, self.blob_path(blob_hex), os.O_RDONLY)
            except FileNotFoundError:
                return None  # removed a moment ago
            return VerifiedFile(fd=fd, size=size)
        return self._partial_reader(partial_key) if partial_key is not None else None

    def _partial_reader(self, key: str) -> VerifiedFile | None:
        partial = self.open_partial(key)
        if partial is None:
            return None
        try:
            fd = partial.reader_fd()
        except StoreError:
            return None  # finalized or closed a moment ago; holdings will say so
        return VerifiedFile(fd=fd, size=partial.size, piece_size=partial.piece_size, done=partial.done)

    async def read_verified(
        self,
        *,
        blob_hex: str | None = None,
        partial_key: str | None = None,
        offset: int,
        length: int,
    ) -> bytes | None:
        """Up to ``length`` verified bytes at ``offset``: any bytes of a complete blob (fewer only
        at its end), or the verified run of an open partial. None when nothing at ``offset`` is
        verified here (the piece is still on its way, the partial or blob just went)."""
        if blob_hex is not None:
            if blob_hex not in self._index.blobs:
                return None
            try:
                # Open, read and close in one worker call: a stream reads a blob a chunk at a time.
                return await asyncio.to_thread(_pread_file, self.blob_path(blob_hex), offset, length)
            except FileNotFoundError:
                return None
        f = self._partial_reader(partial_key) if partial_key is not None else None
        if f is None:
            return None
        with f:
            stop = f.verified_end(offset, offset + length)
            if stop <= offset:
                return None
            return await f.read(offset, stop - offset)

    async def piece_log(self, blob_hex: str) -> bytes | None:
        """A complete blob's piece table as stored (its ``.pieces`` sidecar), for peers."""
        if blob_hex not in self._index.blobs:
            return None
        try:
            return await asyncio.to_thread(self.sidecar_path(blob_hex).read_bytes)
        except FileNotFoundError:
            return None

    # --- blobs ---------------------------------------------------------------------------------

    async def piece_digests(self, blob_hex: str) -> list[bytes]:
        header, records = await asyncio.to_thread(read_piece_log, self.sidecar_path(blob_hex))
        n = len(records)
        if (
            sorted(records) != list(range(n))
            or BlobId.compute(header.size, header.piece_size, [records[i] for i in range(n)]).hex != blob_hex
        ):
            raise IntegrityError(f"piece table of blob blake3:{blob_hex} does not match its id")
        return [records[i] for i in range(n)]

    async def blob_piece_size(self, blob_hex: str) -> int:
        header, _ = await asyncio.to_thread(read_piece_log, self.sidecar_path(blob_hex))
        return header.piece_size

    async def verify_blob(self, blob_hex: str) -> tuple[int, list[int]]:
        """Re-hash every piece of a stored blob: (bytes checked, indices of bad pieces)."""
        digests = await self.piece_digests(blob_hex)
        piece_size = await self.blob_piece_size(blob_hex)
        size = self._index.blobs[blob_hex]
        return await asyncio.to_thread(_verify_sync, self.blob_path(blob_hex), size, piece_size, digests)

    async def read_piece(self, blob_hex: str, index: int, piece_size: int) -> bytes:
        off, length = piece_span(index, self._index.blobs[blob_hex], piece_size)
        return await asyncio.to_thread(_pread_file, self.blob_path(blob_hex), off, length)

    async def rebuild_views_for_blob(self, blob_hex: str) -> None:
        """After a blob was replaced (repair), re-point every view at the new inode."""
        await self._views.rebuild_for_blob(blob_hex)

    # --- what /hf pulled (``pulls``) ------------------------------------------------------------

    async def note_hf_branch(self, repo: str, revision: str, commit: str) -> None:
        """The hub resolved ``revision`` of ``repo`` to ``commit``: remembered, and the hf view's
        ``refs/<revision>`` follows if the node holds that commit."""
        if self.pulls.note_branch(repo, revision, commit, self._clock()):
            await asyncio.to_thread(self.pulls.save_sync, repo)
            await self._views.sync_hf(_stub_manifest(ModelRef.parse(f"hf://{repo}")))

    async def note_hf_listing(self, repo: str, commit: str, paths: tuple[str, ...] | None) -> None:
        """``paths``: every file of the commit (a pulled model is partial until it holds them
        all); None: the commit is complete here (a whole-repo fetch committed it)."""
        changed = (
            self.pulls.forget_listing(repo, commit) if paths is None else self.pulls.note_listing(repo, commit, paths)
        )
        if changed:
            await asyncio.to_thread(self.pulls.save_sync, repo)

    def pulled_missing(self, ref: ModelRef, manifest: Manifest) -> tuple[str, ...] | None:
        """Files an hf model pulled through /hf does not hold yet: () when complete (or not a
        pull), None when not known (it then counts as partial)."""
        if ref.kind is not RefKind.HF or ref.include or ref.exclude or manifest.revision != ref.revision:
            return ()
        return self.pulls.missing(ref.repo, ref.revision, {f.path for f in manifest.files})

    # --- publishing ----------------------------------------------------------------------------

    async def commit_model(
        self, ref: ModelRef, manifest: Manifest, *, sources: dict[str, int] | None = None
    ) -> ModelRecord:
        """Manifest, then view, then ref (last): the model is visible only once all is in place."""
        async with self._ref_lock(ref):
            return await self._commit(ref, manifest, sources)

    async def merge_model(
        self, ref: ModelRef, files: list[FileEntry], *, revision: str, sources: dict[str, int]
    ) -> ModelRecord | None:
        """Add ``files`` (by path) to ``ref``'s model, made if new; None if it had them all.
        Read and commit under the ref's lock, so a whole-model commit of the same ref running
        meanwhile (a prefetch of a commit /hf pulls file by file) is never overwritten by a
        manifest with fewer files."""
        async with self._ref_lock(ref):
            rec = self.model(ref)
            have = {f.path: f for f in rec.manifest.files} if rec is not None else {}
            new = [f for f in files if f.path not in have]
            if not new:
                return None
            have.update({f.path: f for f in new})
            merged = dict(rec.sources) if rec is not None else {}
            for k, v in sources.items():
                merged[k] = merged.get(k, 0) + v
            piece_size = rec.manifest.piece_size if rec is not None else self.cfg.piece_size_bytes
            manifest = Manifest(ref=ref.canonical, revision=revision, piece_size=piece_size, files=tuple(have.values()))
            return await self._commit(ref, manifest, merged)

    @contextlib.asynccontextmanager
    async def _ref_lock(self, ref: ModelRef) -> AsyncIterator[None]:
        lock, users = self._ref_locks.get(ref.canonical, (asyncio.Lock(), 0))
        self._ref_locks[ref.canonical] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._ref_locks[ref.canonical]
            if users <= 1:
                del self._ref_locks[ref.canonical]
            else:
                self._ref_locks[ref.canonical] = (lock, users - 1)

    async def _commit(self, ref: ModelRef, manifest: Manifest, sources: dict[str, int] | None) -> ModelRecord:
        index = self._index
        missing = [f.path for f in manifest.files if f.blob.hex not in index.blobs]
        if missing:
            raise StoreError(f"cannot publish {ref}: blobs missing for {missing[:3]}")
        digest = manifest.digest
        sources = {k: int(v) for k, v in (sources or {}).items()}
        await asyncio.to_thread(self._commit_sync, ref, manifest, digest, sources)
        if digest not in index.manifests:
            self._on_event(ManifestAdded(digest=digest))
        index.manifests[digest] = manifest
        old = index.refs.get(ref.canonical)
        index.refs[ref.canonical] = (digest, self._clock())
        self._on_event(RefChanged(ref=ref.canonical, digest=digest))
        index.sources[ref.canonical] = sources
        if old is not None and old[0] != digest:
            await self._drop_manifest_if_unused(old[0])
        # The hf view follows the index (and is rebuilt from it at start if a crash comes first).
        await self._views.sync_hf(manifest)
        rec = self.model(ref)
        assert rec is not None
        return rec

    def _commit_sync(self, ref: ModelRef, manifest: Manifest, digest: str, sources: dict[str, int]) -> None:
        mpath = self.manifest_path(digest)
        if not mpath.exists():
            durable.atomic_write(mpath, manifest.canonical_bytes(), mode=durable.BLOB_MODE)
        self._views.build_sync(ref, manifest)
        durable.atomic_write(self.layout.ref_path(ref), ref_record(ref, digest, sources))

    # --- removal -------------------------------------------------------------------------------

    async def remove_model(self, ref: ModelRef) -> int:
        """Views, ref, manifest, then blobs no other manifest uses. Returns bytes freed."""
        index = self._index
        entry = index.refs.get(ref.canonical)
        if entry is None:
            raise NotFoundError(f"{ref} is not in the store")
        digest, _ = entry
        await self._views.remove(ref)
        await asyncio.to_thread(self.layout.ref_path(ref).unlink, True)
        del index.refs[ref.canonical]
        index.sources.pop(ref.canonical, None)
        self._on_event(RefChanged(ref=ref.canonical, digest=None))
        freed = await self._drop_manifest_if_unused(digest)
        await self._views.sync_hf(index.manifests.get(digest) or _stub_manifest(ref))
        return freed

    async def release_unretained(self) -> int:
        """After leases ended: drop old revisions nothing holds any more. Returns bytes freed."""
        live = self._index.live_digests()
        freed = 0
        for digest in [d for d in self._index.manifests if d not in live]:
            freed += await self._drop_manifest_if_unused(digest)
        return freed

    async def _drop_manifest_if_unused(self, digest: str) -> int:
        index = self._index
        if digest in index.live_digests():
            return 0
        manifest = index.manifests.pop(digest, None)
        await asyncio.to_thread(self.manifest_path(digest).unlink, True)
        if manifest is None:
            return 0
        self._on_event(ManifestRemoved(digest=digest))
        # The hf view lets go of the revision before its blobs go (HF.md §3.6 rule 7).
        await self._views.sync_hf(manifest)
        still_used = index.blobs_in_use()
        freed = 0
        for f in manifest.files:
            if f.blob.hex not in still_used and not self._space.is_held(f.blob.hex) and f.blob.hex in index.blobs:
                freed += await self._remove_blob(f.blob.hex)
        return freed

    async def remove_blob_if_unused(self, blob_hex: str) -> int:
        """Remove a blob no live manifest uses (eviction and gc of debris). Returns bytes freed."""
        if blob_hex not in self._index.blobs or blob_hex in self._index.blobs_in_use():
            return 0
        return await self._remove_blob(blob_hex)

    async def _remove_blob(self, blob_hex: str) -> int:
        size = self._index.forget_blob(blob_hex)
        self._on_event(BlobRemoved(blob_hex=blob_hex))
        await asyncio.to_thread(durable.remove_tree, self.blob_path(blob_hex))
        await asyncio.to_thread(self.sidecar_path(blob_hex).unlink, True)
        return size

    # --- space (``space``) ---------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._space.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._space.used_bytes

    @property
    def reserved_bytes(self) -> int:
        return self._space.reserved_bytes

    def busy(self, ref: ModelRef) -> contextlib.AbstractContextManager[None]:
        """Mark a ref as being worked on (fetch, repair): eviction leaves it alone meanwhile."""
        return self._space.busy(ref)

    def is_protected(self, ref: str) -> bool:
        return self._space.is_protected(ref)

    def hold_blob(self, blob_hex: str) -> None:
        """A blob a running fetch finalized or reuses, before its manifest is published: kept."""
        self._space.hold_blob(blob_hex)

    def unhold_blob(self, blob_hex: str) -> None:
        self._space.unhold_blob(blob_hex)

    def eviction_plan(self, target_bytes: int) -> EvictionPlan:
        return self._space.eviction_plan(target_bytes)

    async def evict_to(self, target_bytes: int) -> tuple[int, list[str]]:
        """Run one eviction plan down to ``target_bytes``. Returns (bytes freed, refs evicted)."""
        return await self._space.evict_to(target_bytes)

    async def gc(self) -> tuple[int, list[str]]:
        """Bring usage under the low watermark if it is above the high one; always drop debris."""
        return await self._space.gc()

    async def reserve(self, nbytes: int) -> Reservation:
        """Promise ``nbytes`` to a fetch, evicting LRU models if needed; StoreFullError if impossible."""
        return await self._space.reserve(nbytes)

    def reclaimable(self) -> int:
        return self._space.reclaimable()


def _stub_manifest(ref: ModelRef) -> Manifest | None:
    """Just enough of a manifest to name the repo whose hf view must be re-synced."""
    if ref.kind is not RefKind.HF:
        return None
    return Manifest(ref=ref.canonical, piece_size=DEFAULT_PIECE_SIZE, files=())


def _pread_file(path: Path, off: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, off)


def _verify_sync(path: Path, size: int, piece_size: int, digests: list[bytes]) -> tuple[int, list[int]]:
    bad: list[int] = []
    checked = 0
    with open(path, "rb") as f:
        for i, expected in enumerate(digests):
            off, length = piece_span(i, size, piece_size)
            data = os.pread(f.fileno(), length, off)
            checked += len(data)
            if len(data) != length or hash_piece(data) != expected:
                bad.append(i)
    return checked, bad
