"""The two views of the store that launchers read: ``models/<ref>/`` and ``hf/`` (a hub cache).

Both are built from hardlinks to blobs and follow the index: ``models/<escaped ref>`` is swapped
in whole (built under ``tmp/``, then renamed over the old one) before the ref file is written, and
``hf/<repo>`` is re-synced after each change of the repo's manifests (and of the branches ``/hf``
last resolved, ``pulls``: a pulled model is named by its commit, its branch gets ``refs/``). Neither is a source of truth:
at start ``sweep_sync`` rebuilds what a crash left behind or half-built, and removes what no ref
names. The hub-cache layout itself is ``hfview``'s; this module decides when and from what.

This module does not change the index except to drop, at start, a ref whose view cannot be built.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from pathlib import Path

from cached.errors import CachedError
from cached.store import durable, hfview, msview
from cached.store.index import Index
from cached.store.layout import Layout
from cached.store.pulls import Pulls
from cached.types import Manifest, ModelRef

log = logging.getLogger(__name__)


class Views:
    def __init__(self, layout: Layout, index: Index, pulls: Pulls | None = None) -> None:
        self._layout = layout
        self._index = index
        self._pulls = pulls
        self._hf_lock = threading.Lock()
        self._hf_sync_lock = asyncio.Lock()
        self.modelscope = msview.ModelScopeView(layout, index)  # modelscope/: the SDK's cache layout

    # --- models/ -------------------------------------------------------------------------------

    def build_sync(self, ref: ModelRef, manifest: Manifest) -> None:
        staging = self._layout.tmp_dir / f"view-{secrets.token_hex(6)}"
        try:
            durable.make_dirs(staging)
            for f in manifest.files:
                dest = staging / f.path
                durable.make_dirs(dest.parent)
                # Hardlink: a 100 GB model is never stored twice, and the 0440 inode keeps a
                # launcher from changing the cache through its view.
                os.link(self._layout.blob_path(f.blob.hex), dest)
            self._swap_dir(staging, self._layout.view_path(ref))
        except OSError as e:
            durable.remove_tree(staging)
            raise durable.wrap_os_error(e, f"building the view of {ref}") from e

    def _swap_dir(self, new: Path, target: Path) -> None:
        old = None
        if target.exists():
            old = self._layout.tmp_dir / f"old-{secrets.token_hex(6)}"
            os.replace(target, old)
        os.replace(new, target)
        durable.fsync_dir(target.parent)
        if old is not None:
            durable.remove_tree(old)

    async def remove(self, ref: ModelRef) -> None:
        await asyncio.to_thread(durable.remove_tree, self._layout.view_path(ref))

    async def rebuild_for_blob(self, blob_hex: str) -> None:
        """After a blob was replaced (repair), re-point every view at the new inode."""
        index = self._index
        for canonical, (digest, _) in list(index.refs.items()):
            manifest = index.manifests[digest]
            if any(f.blob.hex == blob_hex for f in manifest.files):
                await asyncio.to_thread(self.build_sync, ModelRef.parse(canonical), manifest)

    # --- start ---------------------------------------------------------------------------------

    def sweep_sync(self) -> None:
        """At start: both views made to match the freshly loaded index."""
        self._sweep_models()
        self._sweep_hf()
        self.modelscope.sweep_sync()

    def _sweep_models(self) -> None:
        index, lay = self._index, self._layout
        wanted = {ModelRef.parse(r).escaped: r for r in index.refs}
        for p in lay.models_dir.iterdir():
            if p.name not in wanted:
                durable.remove_tree(p)
        for escaped, ref in wanted.items():
            digest, _ = index.refs[ref]
            manifest = index.manifests[digest]
            view = lay.models_dir / escaped
            if all(self._entry_ok(view / f.path, f.blob.hex) for f in manifest.files):
                continue
            try:
                self.build_sync(ModelRef.parse(ref), manifest)
            except CachedError as e:
                # Not served without its view; the ref file stays, so the next start tries again.
                log.warning("skipping model whose view cannot be rebuilt file=%s reason=%s", lay.refs_dir / escaped, e)
                index.bad_entries["view"] += 1
                del index.refs[ref]
                index.sources.pop(ref, None)

    def _entry_ok(self, path: Path, blob_hex: str) -> bool:
        try:
            return os.path.samefile(path, self._layout.blob_path(blob_hex))
        except OSError:
            return False

    def _sweep_hf(self) -> None:
        hf_dir = self._layout.hf_dir
        durable.make_dirs(hf_dir)
        repos = {hf_repo(self._index.manifests[d].ref) for d in self._index.live_digests()}
        wanted = repos - {None}
        for p in hf_dir.iterdir():
            # Only repo folders live here (HF.md §1 rule 8); anything else is ours from a crash.
            if not any(p.name == hfview.repo_folder(repo) for repo in wanted):
                durable.remove_tree(p)
        for repo in wanted:
            try:
                self._sync_hf_sync(repo, self._hf_revisions(repo))
            except CachedError as e:
                folder = hf_dir / hfview.repo_folder(repo)
                log.warning("skipping hf view that cannot be rebuilt file=%s reason=%s", folder, e)
                self._index.bad_entries["hf_view"] += 1

    # --- hf/ -----------------------------------------------------------------------------------

    def _hf_revisions(self, repo: str) -> list[hfview.HfRevision]:
        """What ``hf/<repo>`` should show: every live manifest of the repo, and ``refs/<branch>``
        for each branch /hf last resolved to a commit held here. Event loop only."""
        index = self._index
        current = {canonical: d for canonical, (d, _) in index.refs.items()}
        manifests = {d: index.manifests[d] for d in index.live_digests() if d in index.manifests}
        touched = {canonical: t for canonical, (_, t) in index.refs.items()}
        timed: list[tuple[float, hfview.HfRevision]] = []
        for digest, m in manifests.items():
            if m.revision is None or hf_repo(m.ref) != repo:
                continue
            ref = ModelRef.parse(m.ref)
            files = tuple(
                hfview.HfFile(
                    path=f.path,
                    size=f.size,
                    blob_hex=f.blob.hex,
                    git_sha1=f.origin.get("git_sha1", ""),
                    sha256=f.origin.get("sha256"),
                )
                for f in m.files
            )
            # Retained old revisions (named=False) keep their snapshot but no refs/ entry.
            rev = hfview.HfRevision(
                revision=ref.revision, commit=m.revision, files=files, named=current.get(m.ref) == digest
            )
            timed.append((touched.get(m.ref, 0.0), rev))
        held = {r.commit for _, r in timed}
        if self._pulls is not None:
            # A pulled model is named by its commit; the branch the client asked for is here.
            for revision, (commit, when) in self._pulls.branches(repo).items():
                if commit in held:
                    timed.append((when, hfview.HfRevision(revision=revision, commit=commit, files=())))
        # Oldest first: when two refs name one branch (say with different include patterns, or a
        # prefetch and a pull) and resolved it at different times, refs/<branch> ends up at the
        # most recent commit.
        return [r for _, r in sorted(timed, key=lambda tr: tr[0])]

    def _sync_hf_sync(self, repo: str, revisions: list[hfview.HfRevision]) -> None:
        """Runs in a worker thread. ``revisions`` were computed on the event loop (which owns the
        index); the lock keeps two syncs of one repo from interleaving their file operations."""
        try:
            with self._hf_lock:
                hfview.sync_repo_sync(self._layout.hf_dir, repo, revisions, self._layout.blob_path)
        except OSError as e:
            raise durable.wrap_os_error(e, f"building the hf view of {repo}") from e

    async def sync_hf(self, manifest: Manifest | None) -> None:
        await self.modelscope.sync(manifest)  # the modelscope/ view follows the same index changes
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
        return (
            self._layout.hf_dir
            / hfview.repo_folder(ModelRef.parse(manifest.ref).repo)
            / "snapshots"
            / manifest.revision
        )


def hf_repo(ref: str) -> str | None:
    """The repo of an hf:// manifest's ref; None for other kinds and for a ref that no longer
    parses (a lease can retain a manifest whose ref an older version accepted)."""
    if not ref.startswith("hf://"):
        return None
    try:
        return ModelRef.parse(ref).repo
    except CachedError:
        return None
