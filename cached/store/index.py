"""The store's in-memory index, and the start-up pass that rebuilds it from disk and sweeps debris.

The filesystem is the source of truth: ``load_sync`` reads ``blobs/``, ``partial/``,
``manifests/`` and ``refs/`` and keeps only what a completed publish left (a blob with a valid
sidecar, a partial with its piece log, a manifest that matches its digest, a ref whose manifest
and blobs are all present); temp files of an interrupted publish and files a crash orphaned are
removed. One bad entry is skipped with a warning and counted in ``bad_entries``, never allowed to
keep the daemon from starting. After the load the index is read and changed on the event loop only.

This module does not build views (``views``), decide what to evict (``space``) or announce changes
(the ``Store`` does, as it changes the index).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter

from cached.errors import CachedError, ConfigError, IntegrityError, StoreError
from cached.store import durable
from cached.store.claims import Claims
from cached.store.layout import Layout
from cached.store.partial import read_piece_log
from cached.types import BlobId, Manifest, ModelRef

log = logging.getLogger(__name__)


class Index:
    def __init__(self, layout: Layout, claims: Claims) -> None:
        self._layout = layout
        self._claims = claims
        self.blobs: dict[str, int] = {}  # blob hex -> size
        self.blob_by_identity: dict[str, str] = {}  # origin identity key -> blob hex
        self.manifests: dict[str, Manifest] = {}  # digest hex -> manifest
        self.refs: dict[str, tuple[str, float]] = {}  # canonical ref -> (manifest digest, last used)
        self.sources: dict[str, dict[str, int]] = {}  # canonical ref -> bytes fetched by source
        self.partial_sizes: dict[str, int] = {}  # partial key -> bytes on disk
        # Entries found on disk at open that could not be indexed or rebuilt, by kind; each was
        # skipped with a warning naming its file (an older version's name, damaged JSON): one
        # bad entry must never keep the daemon from starting.
        self.bad_entries: Counter[str] = Counter()

    # --- queries -------------------------------------------------------------------------------

    def retained_digests(self) -> set[str]:
        """Manifests kept alive by a lease even after their ref moved on (staged rollover)."""
        return {lease.manifest for lease in self._claims.active_leases() if lease.manifest}

    def live_digests(self) -> set[str]:
        return {d for d, _ in self.refs.values()} | (self.retained_digests() & set(self.manifests))

    def blobs_in_use(self) -> set[str]:
        return {f.blob.hex for d in self.live_digests() for f in self.manifests[d].files}

    def forget_blob(self, blob_hex: str) -> int:
        """Drop a blob from the index; returns its size (0 if it was not there)."""
        size = self.blobs.pop(blob_hex, 0)
        for k, v in list(self.blob_by_identity.items()):
            if v == blob_hex:
                del self.blob_by_identity[k]
        return size

    # --- start ---------------------------------------------------------------------------------

    def load_sync(self) -> None:
        """Make the directories, sweep ``tmp/``, load claims, then index blobs, partials,
        manifests and refs, in that order (each step trusts only what the previous one kept)."""
        lay = self._layout
        try:
            for d in (lay.blobs_dir, lay.partial_dir, lay.manifests_dir, lay.refs_dir, lay.models_dir, lay.tmp_dir):
                durable.make_dirs(d)
        except OSError as e:
            # A directory that cannot be made is a configuration problem (exit 78, no restart
            # loop); I/O errors while indexing are not, and stay StoreErrors/OSErrors.
            raise ConfigError("cache_dir", f"cannot use {lay.root}: {e.strerror or e}") from None
        for entry in lay.tmp_dir.iterdir():  # per-attempt files of a previous run
            durable.remove_tree(entry)
        self._claims.load_sync()
        self._index_blobs()
        self._index_partials()
        self._index_manifests()
        self._index_refs()

    def _index_blobs(self) -> None:
        for sub in self._layout.blobs_dir.iterdir():
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
                    self.blobs[p.name] = header.size
                    if header.identity_key:
                        self.blob_by_identity[header.identity_key] = p.name

    def _index_partials(self) -> None:
        partial_dir = self._layout.partial_dir
        for p in partial_dir.iterdir():
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
            elif p.name.endswith(".pieces"):
                if not (partial_dir / p.name.removesuffix(".pieces")).exists():
                    p.unlink(missing_ok=True)
            elif not (partial_dir / (p.name + ".pieces")).exists():
                p.unlink(missing_ok=True)  # bytes with no record of which pieces verified
            else:
                self.partial_sizes[p.name] = p.stat().st_size

    def _index_manifests(self) -> None:
        for p in self._layout.manifests_dir.iterdir():
            digest = p.name.removesuffix(".json")
            try:
                self.manifests[digest] = Manifest.from_bytes(p.read_bytes(), expect_digest=digest)
            except (IntegrityError, OSError) as e:
                log.warning("removing bad manifest file=%s reason=%s", p.name, e)
                self.bad_entries["manifest"] += 1
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)

    def _index_refs(self) -> None:
        used_manifests: set[str] = set()
        for p in self._layout.refs_dir.iterdir():
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
                continue
            try:
                lines = p.read_text().split("\n")
                canonical, digest = lines[:2]
                ref = ModelRef.parse(canonical)
                sources = parse_sources(lines[2] if len(lines) > 2 else "")
                digest = digest.removeprefix("blake3:")
                manifest = self.manifests[digest]
                missing = [f.path for f in manifest.files if f.blob.hex not in self.blobs]
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
            self.refs[ref.canonical] = (digest, mtime)
            self.sources[ref.canonical] = sources
            used_manifests.add(digest)
        for digest in set(self.manifests) - used_manifests - self.retained_digests():
            # Written before a crash that came before its ref: nothing points at it.
            self._layout.manifest_path(digest).unlink(missing_ok=True)
            del self.manifests[digest]


def ref_record(ref: ModelRef, digest: str, sources: dict[str, int]) -> bytes:
    """The content of ``refs/<escaped>``: canonical ref, manifest digest, bytes by source."""
    return f"{ref.canonical}\nblake3:{digest}\n{json.dumps(sources, sort_keys=True)}\n".encode()


def parse_sources(line: str) -> dict[str, int]:
    """The optional third line of a ref file; an unreadable one just means "unknown"."""
    try:
        d = json.loads(line) if line.strip() else {}
        return {str(k): int(v) for k, v in d.items()} if isinstance(d, dict) else {}
    except (ValueError, TypeError):
        return {}
