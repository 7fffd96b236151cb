"""The node's store: blobs, partial blobs, manifests, refs, launcher views, usage and eviction.

The filesystem is the source of truth; the in-memory index is rebuilt by ``open``. Publishing goes
blob -> manifest -> view -> ref (last); deletion goes view -> ref -> manifest -> blobs. A crash at
any point therefore leaves either the old model or the new one, and ``open`` sweeps the debris.

What this module does not do: decide where bytes come from (``cached.transfer``), run jobs
(``cached.jobs``), or decide which node should hold what (``cached.cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cached.config import StoreConfig
from cached.errors import CachedError, ConfigError, IntegrityError, NotFoundError, StoreError, StoreFullError
from cached.store import durable, hfview
from cached.store.claims import Claims
from cached.store.eviction import Debris, EvictionPlan, ModelUsage, plan_eviction, reclaimable_bytes
from cached.store.partial import PartialBlob, PieceLogHeader, read_piece_log
from cached.store.protection import Protector
from cached.types import DEFAULT_PIECE_SIZE, BlobId, Manifest, ModelRef, RefKind, format_size, hash_piece, piece_span

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    ref: str
    manifest: Manifest
    last_used: float
    path: Path
    sources: dict[str, int]  # bytes fetched for it on this node, by source ("origin", "peer")


class Reservation:
    """Space promised to a fetch before its partial files exist; shrinks as they are created."""

    def __init__(self, store: "Store", nbytes: int, evicted: list[str] | None = None) -> None:
        self._store = store
        self.remaining = nbytes
        self.evicted = evicted or []  # models evicted to make room for it

    def consume(self, nbytes: int) -> None:
        self.remaining = max(0, self.remaining - nbytes)

    def release(self) -> None:
        self._store._reservations.discard(self)


class Store:
    def __init__(self, cfg: StoreConfig, *, clock: Callable[[], float] = time.time, protector: Protector | None = None) -> None:
        self.cfg = cfg
        self.root = cfg.cache_dir
        self.blobs_dir = self.root / "blobs"
        self.partial_dir = self.root / "partial"
        self.manifests_dir = self.root / "manifests"
        self.refs_dir = self.root / "refs"
        self.models_dir = self.root / "models"
        self.hf_dir = self.root / "hf"
        self.tmp_dir = self.root / "tmp"
        self.claims = Claims(self.root / "claims", clock=clock)
        self._clock = clock
        self._blobs: dict[str, int] = {}  # blob hex -> size
        self._blob_by_identity: dict[str, str] = {}  # origin identity key -> blob hex
        self._manifests: dict[str, Manifest] = {}  # digest hex -> manifest
        self._refs: dict[str, tuple[str, float]] = {}  # canonical ref -> (manifest digest, last used)
        self._sources: dict[str, dict[str, int]] = {}  # canonical ref -> bytes fetched by source
        self._partial_sizes: dict[str, int] = {}  # partial key -> bytes on disk
        self._open_partials: dict[str, tuple[PartialBlob, int]] = {}  # key -> (partial, users)
        self._partial_locks: dict[str, asyncio.Lock] = {}
        self._busy: Counter[str] = Counter()  # refs a job is working on: never evicted
        self._reservations: set[Reservation] = set()
        # Blobs finalized by a running fetch whose manifest is not published yet: not debris.
        self._pending: Counter[str] = Counter()
        self._evict_lock = asyncio.Lock()
        self._hf_lock = threading.Lock()
        self._hf_sync_lock = asyncio.Lock()
        self.capacity_bytes = 0
        self._protector = protector  # the cluster's say on what must stay (cached.cluster.ReplicaGuard)
        # Told of every change peers may care about (cached.peers.holdings ops); event loop only.
        self.on_change: Callable[[list[Any]], None] = lambda op: None
        # Entries found on disk at open that could not be indexed or rebuilt, by kind; each was
        # skipped with a warning naming its file (an older version's name, damaged JSON): one
        # bad entry must never keep the daemon from starting.
        self.bad_entries: Counter[str] = Counter()

    # --- start ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)
        log.info(
            "store indexed dir=%s blobs=%d models=%d partials=%d used=%s capacity=%s",
            self.root, len(self._blobs), len(self._refs), len(self._partial_sizes),
            format_size(self.used_bytes), format_size(self.capacity_bytes),
        )

    def _open_sync(self) -> None:
        try:
            for d in (self.blobs_dir, self.partial_dir, self.manifests_dir, self.refs_dir, self.models_dir, self.tmp_dir):
                durable.make_dirs(d)
        except OSError as e:
            # A directory that cannot be made is a configuration problem (exit 78, no restart
            # loop); I/O errors while indexing are not, and stay StoreErrors/OSErrors.
            raise ConfigError("cache_dir", f"cannot use {self.root}: {e.strerror or e}") from None
        for entry in self.tmp_dir.iterdir():  # per-attempt files of a previous run
            durable.remove_tree(entry)
        self.claims.load_sync()
        self.capacity_bytes = self._capacity()
        self._index_blobs()
        self._index_partials()
        self._index_manifests()
        self._index_refs()
        self._sweep_views()
        self._sweep_hf_view()
        if self.claims.skipped:
            self.bad_entries["claim"] += self.claims.skipped

    def _index_blobs(self) -> None:
        for sub in self.blobs_dir.iterdir():
            if not sub.is_dir():
                sub.unlink(missing_ok=True)
                continue
            for p in sub.iterdir():
                if p.name.startswith("."):  # temp file of an interrupted publish
                    p.unlink(missing_ok=True)
                elif p.name.endswith(".pieces"):
                    if not (sub / p.name.removesuffix(".pieces")).exists():
                        p.unlink(missing_ok=True)  # crash between sidecar and blob rename
                else:
                    sidecar = sub / (p.name + ".pieces")
                    try:
                        header, _ = read_piece_log(sidecar)
                        BlobId.parse(p.name)
                        if p.stat().st_size != header.size:
                            raise StoreError("size differs from sidecar")
                    except (StoreError, ValueError) as e:
                        log.warning("removing blob without a valid sidecar blob=%s reason=%s", p.name, e)
                        durable.remove_tree(p)
                        sidecar.unlink(missing_ok=True)
                        continue
                    self._blobs[p.name] = header.size
                    if header.identity_key:
                        self._blob_by_identity[header.identity_key] = p.name

    def _index_partials(self) -> None:
        for p in self.partial_dir.iterdir():
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
            elif p.name.endswith(".pieces"):
                if not (self.partial_dir / p.name.removesuffix(".pieces")).exists():
                    p.unlink(missing_ok=True)
            elif not (self.partial_dir / (p.name + ".pieces")).exists():
                p.unlink(missing_ok=True)  # bytes with no record of which pieces verified
            else:
                self._partial_sizes[p.name] = p.stat().st_size

    def _index_manifests(self) -> None:
        for p in self.manifests_dir.iterdir():
            digest = p.name.removesuffix(".json")
            try:
                self._manifests[digest] = Manifest.from_bytes(p.read_bytes(), expect_digest=digest)
            except (IntegrityError, OSError) as e:
                log.warning("removing bad manifest file=%s reason=%s", p.name, e)
                self.bad_entries["manifest"] += 1
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)

    def _index_refs(self) -> None:
        used_manifests: set[str] = set()
        for p in self.refs_dir.iterdir():
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
                continue
            try:
                lines = p.read_text().split("\n")
                canonical, digest = lines[:2]
                ref = ModelRef.parse(canonical)
                sources = _parse_sources(lines[2] if len(lines) > 2 else "")
                digest = digest.removeprefix("blake3:")
                manifest = self._manifests[digest]
                missing = [f.path for f in manifest.files if f.blob.hex not in self._blobs]
                if missing or ref.escaped != p.name:
                    raise StoreError(f"blobs missing for {missing[:3]}")
                mtime = p.stat().st_mtime
            except (ValueError, KeyError, CachedError, OSError) as e:
                # CachedError: a ref an older version accepted may not parse under today's
                # bounds (a revision too long to be a file name).
                log.warning("dropping broken ref file=%s reason=%s", p.name, e)
                self.bad_entries["ref"] += 1
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)
                continue
            self._refs[ref.canonical] = (digest, mtime)
            self._sources[ref.canonical] = sources
            used_manifests.add(digest)
        for digest in set(self._manifests) - used_manifests - self.retained_digests():
            # Written before a crash that came before its ref: nothing points at it.
            (self.manifests_dir / f"{digest}.json").unlink(missing_ok=True)
            del self._manifests[digest]

    def _sweep_views(self) -> None:
        wanted = {ModelRef.parse(r).escaped: r for r in self._refs}
        for p in self.models_dir.iterdir():
            if p.name not in wanted:
                durable.remove_tree(p)
        for escaped, ref in wanted.items():
            digest, _ = self._refs[ref]
            manifest = self._manifests[digest]
            view = self.models_dir / escaped
            if all(self._view_entry_ok(view / f.path, f.blob.hex) for f in manifest.files):
                continue
            try:
                self._build_view_sync(ModelRef.parse(ref), manifest)
            except CachedError as e:
                # Not served without its view; the ref file stays, so the next start tries again.
                log.warning("skipping model whose view cannot be rebuilt file=%s reason=%s", self.refs_dir / escaped, e)
                self.bad_entries["view"] += 1
                del self._refs[ref]
                self._sources.pop(ref, None)

    def _sweep_hf_view(self) -> None:
        durable.make_dirs(self.hf_dir)
        repos = {_hf_repo(self._manifests[d].ref) for d in self._live_digests()}
        wanted = repos - {None}
        for p in self.hf_dir.iterdir():
            # Only repo folders live here (HF.md §1 rule 8); anything else is ours from a crash.
            if not any(p.name == hfview.repo_folder(repo) for repo in wanted):
                durable.remove_tree(p)
        for repo in wanted:
            try:
                self._sync_hf_sync(repo, self._hf_revisions(repo))
            except CachedError as e:
                folder = self.hf_dir / hfview.repo_folder(repo)
                log.warning("skipping hf view that cannot be rebuilt file=%s reason=%s", folder, e)
                self.bad_entries["hf_view"] += 1

    def _hf_revisions(self, repo: str) -> list[hfview.HfRevision]:
        """What ``hf/<repo>`` should show: every live manifest of the repo. Event loop only."""
        current = {canonical: d for canonical, (d, _) in self._refs.items()}
        manifests = {d: self._manifests[d] for d in self._live_digests() if d in self._manifests}
        touched = {canonical: t for canonical, (_, t) in self._refs.items()}
        out = []
        # Oldest first: when two refs name one branch (say with different include patterns) and
        # resolved it at different times, refs/<branch> ends up at the most recent commit.
        for digest, m in sorted(manifests.items(), key=lambda kv: touched.get(kv[1].ref, 0.0)):
            if m.revision is None or _hf_repo(m.ref) != repo:
                continue
            ref = ModelRef.parse(m.ref)
            files = tuple(
                hfview.HfFile(path=f.path, size=f.size, blob_hex=f.blob.hex, git_sha1=f.origin.get("git_sha1", ""), sha256=f.origin.get("sha256"))
                for f in m.files
            )
            # Retained old revisions (named=False) keep their snapshot but no refs/ entry.
            out.append(hfview.HfRevision(revision=ref.revision, commit=m.revision, files=files, named=current.get(m.ref) == digest))
        return out

    def _sync_hf_sync(self, repo: str, revisions: list[hfview.HfRevision]) -> None:
        """Runs in a worker thread. ``revisions`` were computed on the event loop (which owns the
        index); the lock keeps two syncs of one repo from interleaving their file operations."""
        try:
            with self._hf_lock:
                hfview.sync_repo_sync(self.hf_dir, repo, revisions, self.blob_path)
        except OSError as e:
            raise durable.wrap_os_error(e, f"building the hf view of {repo}") from e

    async def _sync_hf(self, manifest: Manifest | None) -> None:
        if manifest is None or not manifest.ref.startswith("hf://"):
            return
        repo = ModelRef.parse(manifest.ref).repo
        # One sync at a time, each computed from the index as it is when the sync starts: the
        # last one to run always reflects the latest state, whatever order commits finish in.
        async with self._hf_sync_lock:
            await asyncio.to_thread(self._sync_hf_sync, repo, self._hf_revisions(repo))

    def hf_snapshot(self, manifest: Manifest) -> Path | None:
        """``hf/models--org--name/snapshots/<commit>``: a per-commit path that outlives a refresh."""
        if not manifest.ref.startswith("hf://") or manifest.revision is None:
            return None
        return self.hf_dir / hfview.repo_folder(ModelRef.parse(manifest.ref).repo) / "snapshots" / manifest.revision

    def retained_digests(self) -> set[str]:
        """Manifests kept alive by a lease even after their ref moved on (staged rollover)."""
        return {lease.manifest for lease in self.claims.active_leases() if lease.manifest}

    def _live_digests(self) -> set[str]:
        return {d for d, _ in self._refs.values()} | (self.retained_digests() & set(self._manifests))

    def retained_for(self, ref: ModelRef) -> list[Manifest]:
        """Older revisions of ``ref`` still held by leases."""
        current = self._refs.get(ref.canonical, ("", 0.0))[0]
        return [self._manifests[d] for d in sorted(self.retained_digests()) if d in self._manifests and d != current and self._manifests[d].ref == ref.canonical]

    async def release_unretained(self) -> int:
        """After leases ended: drop old revisions nothing holds any more. Returns bytes freed."""
        live = self._live_digests()
        freed = 0
        for digest in [d for d in self._manifests if d not in live]:
            freed += await self._drop_manifest_if_unused(digest)
        return freed

    def _view_entry_ok(self, path: Path, blob_hex: str) -> bool:
        try:
            return os.path.samefile(path, self.blob_path(blob_hex))
        except OSError:
            return False

    def reconfigure(self, cfg: StoreConfig) -> None:
        """SIGHUP: new capacity and watermarks (the directory and piece size need a restart)."""
        self.cfg = cfg
        self.capacity_bytes = self._capacity()

    def _capacity(self) -> int:
        if self.cfg.max_bytes:
            return self.cfg.max_bytes
        st = os.statvfs(self.root)
        return int(st.f_blocks * st.f_frsize * 0.9)

    # --- paths and queries ---------------------------------------------------------------------

    def blob_path(self, blob_hex: str) -> Path:
        return self.blobs_dir / blob_hex[:2] / blob_hex

    def sidecar_path(self, blob_hex: str) -> Path:
        return self.blobs_dir / blob_hex[:2] / f"{blob_hex}.pieces"

    def view_path(self, ref: ModelRef) -> Path:
        return self.models_dir / ref.escaped

    def has_blob(self, blob_hex: str) -> bool:
        return blob_hex in self._blobs

    def holdings_ops(self) -> list[list[Any]]:
        """The whole current state as holdings ops (to seed cached.peers.holdings at start)."""
        keys = {h: k for k, h in self._blob_by_identity.items()}
        ops: list[list[Any]] = [["blob+", h, size, keys.get(h, "")] for h, size in self._blobs.items()]
        ops += [["manifest+", d] for d in sorted(self._manifests)]
        ops += [["ref", canonical, d] for canonical, (d, _) in sorted(self._refs.items())]
        for key, (partial, _) in self._open_partials.items():
            ops.append(["partial+", key, partial.size, partial.piece_size])
            ops += [["piece", key, i, d.hex()] for i, d in partial.done.items()]
        return ops

    def manifest_path(self, digest: str) -> Path:
        return self.manifests_dir / f"{digest}.json"

    def ref_digest(self, ref: ModelRef) -> str | None:
        entry = self._refs.get(ref.canonical)
        return entry[0] if entry else None

    def open_partial(self, key: str) -> PartialBlob | None:
        """The in-progress partial of ``key`` if a fetch has it open (to stream verified pieces)."""
        entry = self._open_partials.get(key)
        return entry[0] if entry is not None else None

    def has_partial(self, key: str) -> bool:
        return key in self._partial_sizes

    def blob_for_identity(self, identity_key: str) -> str | None:
        hex_ = self._blob_by_identity.get(identity_key)
        return hex_ if hex_ in self._blobs else None

    def model(self, ref: ModelRef) -> ModelRecord | None:
        entry = self._refs.get(ref.canonical)
        if entry is None:
            return None
        digest, last_used = entry
        return ModelRecord(
            ref=ref.canonical, manifest=self._manifests[digest], last_used=last_used, path=self.view_path(ref),
            sources=dict(self._sources.get(ref.canonical, {})),
        )

    def models(self) -> list[ModelRecord]:
        out = []
        for canonical in sorted(self._refs):
            rec = self.model(ModelRef.parse(canonical))
            if rec is not None:
                out.append(rec)
        return out

    def manifest(self, digest: str) -> Manifest | None:
        return self._manifests.get(digest)

    @property
    def used_bytes(self) -> int:
        return sum(self._blobs.values()) + sum(self._partial_sizes.values())

    @property
    def reserved_bytes(self) -> int:
        return sum(r.remaining for r in self._reservations)

    def blob_count(self) -> int:
        return len(self._blobs)

    async def touch(self, ref: ModelRef) -> None:
        entry = self._refs.get(ref.canonical)
        if entry is None:
            return
        now = self._clock()
        self._refs[ref.canonical] = (entry[0], now)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.utime, self.refs_dir / ref.escaped, (now, now))

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
            self.claims.is_pinned(ref)
            or bool(self.claims.leases_for(ref))
            or ref in self._busy
            or (self._protector is not None and self._protector.protects(ref))
        )

    # --- partial blobs -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def partial(self, *, key: str, size: int, piece_size: int, identity_key: str, reservation: Reservation | None = None):
        """Open (or join) the partial blob ``key``; every user of one key shares one object."""
        lock = self._partial_locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._open_partials.get(key)
            if entry is None:
                header = PieceLogHeader(size=size, piece_size=piece_size, identity_key=identity_key)
                partial = PartialBlob(key=key, header=header, data_path=self.partial_dir / key, log_path=self.partial_dir / f"{key}.pieces")
                fresh = key not in self._partial_sizes
                opening = asyncio.ensure_future(asyncio.to_thread(partial.open_sync))
                try:
                    kept = await asyncio.shield(opening)
                except asyncio.CancelledError:
                    # The thread runs on and creates the files: let it finish, close its fds,
                    # and record the files so that evict and gc can find and drop them.
                    await asyncio.gather(opening, return_exceptions=True)
                    if not opening.cancelled() and opening.exception() is None:
                        await asyncio.to_thread(partial.close_sync)
                        self._partial_sizes[key] = size
                    raise
                if kept:
                    log.info("resuming partial blob key=%s verified_pieces=%d of=%d", key[:16], kept, partial.pieces)
                if fresh and reservation is not None:
                    reservation.consume(size)
                self._partial_sizes[key] = size
                self.on_change(["partial+", key, size, piece_size])
                for index, digest in list(partial.done.items()):
                    self.on_change(["piece", key, index, digest.hex()])
                loop = asyncio.get_running_loop()
                # Pieces are recorded in worker threads; peers hear of each on the event loop.
                partial.on_piece = lambda i, d, k=key: loop.call_soon_threadsafe(self.on_change, ["piece", k, i, d.hex()])
                entry = (partial, 0)
            self._open_partials[key] = (entry[0], entry[1] + 1)
        try:
            yield entry[0]
        finally:
            partial, users = self._open_partials[key]
            if users <= 1:
                del self._open_partials[key]
                self._partial_locks.pop(key, None)
                await asyncio.shield(asyncio.to_thread(partial.close_sync))
            else:
                self._open_partials[key] = (partial, users - 1)

    async def finalize(self, partial: PartialBlob, *, replace: bool = False) -> BlobId:
        """Publish a complete partial as a blob. An identical blob already present wins (dedupe)."""
        digests = [partial.done[i] for i in range(partial.pieces)]
        blob_id = BlobId.compute(partial.size, partial.piece_size, digests)
        if blob_id.hex in self._blobs and not replace:
            await asyncio.to_thread(partial.discard_sync)
        else:
            await asyncio.to_thread(partial.finalize_sync, self.blob_path(blob_id.hex), self.sidecar_path(blob_id.hex))
            self._blobs[blob_id.hex] = partial.size
            self.on_change(["blob+", blob_id.hex, partial.size, partial.header.identity_key])
        self._partial_sizes.pop(partial.key, None)
        self.on_change(["partial-", partial.key])
        if partial.header.identity_key:
            self._blob_by_identity[partial.header.identity_key] = blob_id.hex
        return blob_id

    async def discard_partial(self, key: str) -> None:
        entry = self._open_partials.get(key)
        if entry is not None:
            await asyncio.to_thread(entry[0].discard_sync)
        else:
            await asyncio.to_thread(_unlink_partial, self.partial_dir, key)
        self._partial_sizes.pop(key, None)
        self.on_change(["partial-", key])

    # --- blobs ---------------------------------------------------------------------------------

    async def piece_digests(self, blob_hex: str) -> list[bytes]:
        header, records = await asyncio.to_thread(read_piece_log, self.sidecar_path(blob_hex))
        n = len(records)
        if sorted(records) != list(range(n)) or BlobId.compute(header.size, header.piece_size, [records[i] for i in range(n)]).hex != blob_hex:
            raise IntegrityError(f"piece table of blob blake3:{blob_hex} does not match its id")
        return [records[i] for i in range(n)]

    async def blob_piece_size(self, blob_hex: str) -> int:
        header, _ = await asyncio.to_thread(read_piece_log, self.sidecar_path(blob_hex))
        return header.piece_size

    async def verify_blob(self, blob_hex: str) -> tuple[int, list[int]]:
        """Re-hash every piece of a stored blob: (bytes checked, indices of bad pieces)."""
        digests = await self.piece_digests(blob_hex)
        piece_size = await self.blob_piece_size(blob_hex)
        size = self._blobs[blob_hex]
        return await asyncio.to_thread(_verify_sync, self.blob_path(blob_hex), size, piece_size, digests)

    async def read_piece(self, blob_hex: str, index: int, piece_size: int) -> bytes:
        off, length = piece_span(index, self._blobs[blob_hex], piece_size)
        return await asyncio.to_thread(_pread_file, self.blob_path(blob_hex), off, length)

    # --- publishing ----------------------------------------------------------------------------

    async def commit_model(self, ref: ModelRef, manifest: Manifest, *, sources: dict[str, int] | None = None) -> ModelRecord:
        """Manifest, then view, then ref (last): the model is visible only once all is in place."""
        missing = [f.path for f in manifest.files if f.blob.hex not in self._blobs]
        if missing:
            raise StoreError(f"cannot publish {ref}: blobs missing for {missing[:3]}")
        digest = manifest.digest
        sources = {k: int(v) for k, v in (sources or {}).items()}
        await asyncio.to_thread(self._commit_sync, ref, manifest, digest, sources)
        if digest not in self._manifests:
            self.on_change(["manifest+", digest])
        self._manifests[digest] = manifest
        old = self._refs.get(ref.canonical)
        self._refs[ref.canonical] = (digest, self._clock())
        self.on_change(["ref", ref.canonical, digest])
        self._sources[ref.canonical] = sources
        if old is not None and old[0] != digest:
            await self._drop_manifest_if_unused(old[0])
        # The hf view follows the index (and is rebuilt from it at start if a crash comes first).
        await self._sync_hf(manifest)
        rec = self.model(ref)
        assert rec is not None
        return rec

    def _commit_sync(self, ref: ModelRef, manifest: Manifest, digest: str, sources: dict[str, int]) -> None:
        mpath = self.manifests_dir / f"{digest}.json"
        if not mpath.exists():
            durable.atomic_write(mpath, manifest.canonical_bytes(), mode=durable.BLOB_MODE)
        self._build_view_sync(ref, manifest)
        record = f"{ref.canonical}\nblake3:{digest}\n{json.dumps(sources, sort_keys=True)}\n"
        durable.atomic_write(self.refs_dir / ref.escaped, record.encode())

    def _build_view_sync(self, ref: ModelRef, manifest: Manifest) -> None:
        staging = self.tmp_dir / f"view-{secrets.token_hex(6)}"
        try:
            durable.make_dirs(staging)
            for f in manifest.files:
                dest = staging / f.path
                durable.make_dirs(dest.parent)
                # Hardlink: a 100 GB model is never stored twice, and the 0440 inode keeps a
                # launcher from changing the cache through its view.
                os.link(self.blob_path(f.blob.hex), dest)
            self._swap_dir(staging, self.view_path(ref))
        except OSError as e:
            durable.remove_tree(staging)
            raise durable.wrap_os_error(e, f"building the view of {ref}") from e

    def _swap_dir(self, new: Path, target: Path) -> None:
        old = None
        if target.exists():
            old = self.tmp_dir / f"old-{secrets.token_hex(6)}"
            os.replace(target, old)
        os.replace(new, target)
        durable.fsync_dir(target.parent)
        if old is not None:
            durable.remove_tree(old)

    async def rebuild_views_for_blob(self, blob_hex: str) -> None:
        """After a blob was replaced (repair), re-point every view at the new inode."""
        for canonical, (digest, _) in list(self._refs.items()):
            manifest = self._manifests[digest]
            if any(f.blob.hex == blob_hex for f in manifest.files):
                await asyncio.to_thread(self._build_view_sync, ModelRef.parse(canonical), manifest)

    # --- removal -------------------------------------------------------------------------------

    async def remove_model(self, ref: ModelRef) -> int:
        """Views, ref, manifest, then blobs no other manifest uses. Returns bytes freed."""
        entry = self._refs.get(ref.canonical)
        if entry is None:
            raise NotFoundError(f"{ref} is not in the store")
        digest, _ = entry
        await asyncio.to_thread(durable.remove_tree, self.view_path(ref))
        await asyncio.to_thread((self.refs_dir / ref.escaped).unlink, True)
        del self._refs[ref.canonical]
        self._sources.pop(ref.canonical, None)
        self.on_change(["ref", ref.canonical, None])
        freed = await self._drop_manifest_if_unused(digest)
        await self._sync_hf(self._manifests.get(digest) or _stub_manifest(ref))
        return freed

    async def _drop_manifest_if_unused(self, digest: str) -> int:
        if digest in self._live_digests():
            return 0
        manifest = self._manifests.pop(digest, None)
        await asyncio.to_thread((self.manifests_dir / f"{digest}.json").unlink, True)
        if manifest is None:
            return 0
        self.on_change(["manifest-", digest])
        # The hf view lets go of the revision before its blobs go (HF.md §3.6 rule 7).
        await self._sync_hf(manifest)
        still_used = self._blobs_in_use()
        freed = 0
        for f in manifest.files:
            if f.blob.hex not in still_used and f.blob.hex not in self._pending and f.blob.hex in self._blobs:
                freed += await self._remove_blob(f.blob.hex)
        return freed

    async def _remove_blob(self, blob_hex: str) -> int:
        size = self._blobs.pop(blob_hex, 0)
        self.on_change(["blob-", blob_hex])
        await asyncio.to_thread(durable.remove_tree, self.blob_path(blob_hex))
        await asyncio.to_thread(self.sidecar_path(blob_hex).unlink, True)
        for k, v in list(self._blob_by_identity.items()):
            if v == blob_hex:
                del self._blob_by_identity[k]
        return size

    def _blobs_in_use(self) -> set[str]:
        return {f.blob.hex for d in self._live_digests() for f in self._manifests[d].files}

    # --- space ---------------------------------------------------------------------------------

    def _usage(self) -> tuple[list[ModelUsage], list[Debris]]:
        models = [
            ModelUsage(
                ref=canonical,
                last_used=last_used,
                blobs=frozenset(f.blob.hex for f in self._manifests[digest].files),
                protected=self.is_protected(canonical),
            )
            for canonical, (digest, last_used) in self._refs.items()
        ]
        if self._pending:
            # Blobs a running fetch holds count as held by a model nothing may evict.
            models.append(ModelUsage(ref="", last_used=0.0, blobs=frozenset(self._pending), protected=True))
        in_use = self._blobs_in_use()
        debris = [Debris(kind="blob", key=b, size=s) for b, s in self._blobs.items() if b not in in_use and b not in self._pending]
        debris += [Debris(kind="partial", key=k, size=s) for k, s in self._partial_sizes.items() if k not in self._open_partials]
        return models, debris

    def hold_blob(self, blob_hex: str) -> None:
        self._pending[blob_hex] += 1

    def unhold_blob(self, blob_hex: str) -> None:
        if self._pending[blob_hex] > 0:
            self._pending[blob_hex] -= 1
        if not self._pending[blob_hex]:
            del self._pending[blob_hex]

    def plan(self, target_bytes: int) -> EvictionPlan:
        models, debris = self._usage()
        return plan_eviction(
            models=models, blob_sizes=self._blobs, debris=debris,
            used_bytes=self.used_bytes + self.reserved_bytes, target_bytes=target_bytes,
        )

    async def evict_to(self, target_bytes: int) -> tuple[int, list[str]]:
        """Run one eviction plan down to ``target_bytes``. Returns (bytes freed, refs evicted)."""
        async with self._evict_lock:
            plan = self.plan(target_bytes)
            freed = 0
            for d in plan.debris:
                if d.kind == "blob" and d.key in self._blobs and d.key not in self._blobs_in_use():
                    freed += await self._remove_blob(d.key)
                elif d.kind == "partial" and d.key not in self._open_partials:
                    await self.discard_partial(d.key)
                    freed += d.size
            evicted = []
            for canonical in plan.models:
                if canonical in self._refs and not self.is_protected(canonical):
                    freed += await self.remove_model(ModelRef.parse(canonical))
                    evicted.append(canonical)
                    log.info("evicted model ref=%s", canonical)
            return freed, evicted

    async def gc(self) -> tuple[int, list[str]]:
        """Bring usage under the low watermark if it is above the high one; always drop debris."""
        freed, evicted = 0, []
        if self.used_bytes > self.capacity_bytes * self.cfg.high_watermark:
            freed, evicted = await self.evict_to(int(self.capacity_bytes * self.cfg.low_watermark))
        models, debris = self._usage()
        for d in debris:
            if d.kind == "blob" and d.key in self._blobs and d.key not in self._blobs_in_use():
                freed += await self._remove_blob(d.key)
        return freed, evicted

    async def reserve(self, nbytes: int) -> Reservation:
        """Promise ``nbytes`` to a fetch, evicting LRU models if needed; StoreFullError if impossible."""
        limit = self.capacity_bytes - nbytes
        over = self.used_bytes + self.reserved_bytes - limit
        # The filesystem may hold less than the capacity says (max_bytes above the disk size, a
        # disk shared with other data): what it lacks must be freed too.
        st = await asyncio.to_thread(os.statvfs, self.root)
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
        return reclaimable_bytes(models=models, blob_sizes=self._blobs, debris=debris)


def _hf_repo(ref: str) -> str | None:
    """The repo of an hf:// manifest's ref; None for other kinds and for a ref that no longer
    parses (a lease can retain a manifest whose ref an older version accepted)."""
    if not ref.startswith("hf://"):
        return None
    try:
        return ModelRef.parse(ref).repo
    except CachedError:
        return None


def _stub_manifest(ref: ModelRef) -> Manifest | None:
    """Just enough of a manifest to name the repo whose hf view must be re-synced."""
    if ref.kind is not RefKind.HF:
        return None
    return Manifest(ref=ref.canonical, piece_size=DEFAULT_PIECE_SIZE, files=())


def _parse_sources(line: str) -> dict[str, int]:
    """The optional third line of a ref file; an unreadable one just means "unknown"."""
    try:
        d = json.loads(line) if line.strip() else {}
        return {str(k): int(v) for k, v in d.items()} if isinstance(d, dict) else {}
    except (ValueError, TypeError):
        return {}


def _unlink_partial(partial_dir: Path, key: str) -> None:
    (partial_dir / key).unlink(missing_ok=True)
    (partial_dir / f"{key}.pieces").unlink(missing_ok=True)


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
