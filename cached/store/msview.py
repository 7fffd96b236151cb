"""The ``modelscope/`` view: the store's modelscope:// models laid out as the ModelScope SDK's cache.

``MODELSCOPE_CACHE=<cache_dir>/modelscope`` lets ``modelscope.snapshot_download(model_id,
revision=..., local_files_only=True)`` (and ``model_file_download``, ``AutoModel.from_pretrained``
through it) load a model with no network. The layout is the SDK's own (``modelscope_hub._download``,
which ``modelscope`` >= 1.38 delegates to)::

    <cache_dir>/modelscope/models/<org>--<name>/snapshots/<revision>/<path>

``<revision>`` is what the ref named (``master`` unless ``@REV``), plus the pinned commit id; the SDK, offline, takes ``snapshots/<revision>`` when asked for a revision and
``snapshots/master`` (then ``main``) when not. Files are hardlinks to the store's blobs (no second
copy; the read-only inode keeps a launcher from changing the cache through the view).

The SDK's pre-1.38 layout (``models/<org>/<name with . as ___>/`` with ``.mdl``/``.msc``) is not
written: the current SDK prefers such a folder over ``snapshots/`` whatever revision it is asked
for, so writing it would make ``revision=`` silently load whichever revision was written last.

``sync_repo_sync`` makes one repo folder match a desired state: each snapshot is built under
``tmp/`` and renamed into place whole, so a launcher sees the old snapshot or the new one.
This module decides the layout only; ``views`` decides when and from what index state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from cached.errors import CachedError
from cached.store import durable
from cached.store.index import Index
from cached.store.layout import Layout
from cached.types import Manifest, ModelRef, RefKind

log = logging.getLogger(__name__)

ROOT = "modelscope"
PREFIX = "modelscope://"
# revision -> {path: blob hex}: what one repo's snapshots/ should hold
Snapshots = dict[str, dict[str, str]]


def cache_root(layout: Layout) -> Path:
    """The directory a launcher sets ``MODELSCOPE_CACHE`` to."""
    return layout.root / ROOT


def repo_folder(repo: str) -> str:
    # modelscope_hub: repo_id.replace("/", "--"); refs forbid "--" in a part, so this is one-to-one.
    return repo.replace("/", "--")


def repo_dir(layout: Layout, repo: str) -> Path:
    return cache_root(layout) / "models" / repo_folder(repo)


def ms_repo(ref: str) -> str | None:
    if not ref.startswith(PREFIX):
        return None
    try:
        return ModelRef.parse(ref).repo
    except CachedError:
        return None


def desired(index: Index, repo: str) -> Snapshots:
    """The snapshots of ``repo`` the index's current refs name. Event loop only (it owns the index).
    Refs naming one revision (say with different include patterns) are merged, the most recently
    committed last, so a path shows the newest resolve's file."""
    out: Snapshots = {}
    for canonical, (digest, _) in sorted(index.refs.items(), key=lambda kv: kv[1][1]):
        if ms_repo(canonical) != repo or digest not in index.manifests:
            continue
        ref, manifest = ModelRef.parse(canonical), index.manifests[digest]
        files = {f.path: f.blob.hex for f in manifest.files}
        for revision in {ref.revision, manifest.revision or ref.revision}:
            out.setdefault(revision, {}).update(files)
    return out


def sync_repo_sync(layout: Layout, repo: str, wanted: Snapshots) -> None:
    """Make ``models/<org>--<name>/snapshots/`` hold exactly ``wanted``. Worker thread."""
    folder = repo_dir(layout, repo)
    snapshots = folder / "snapshots"
    for revision, files in wanted.items():
        target = snapshots / revision
        if not _matches(target, files, layout.blob_path):
            _build(layout, target, files)
    if snapshots.is_dir():
        keep = {r.split("/")[0] for r in wanted}
        for p in snapshots.iterdir():
            if p.name not in keep:
                durable.remove_tree(p)
    if not wanted and folder.exists():
        durable.remove_tree(folder)


def _matches(target: Path, files: Mapping[str, str], blob_path: Callable[[str], Path]) -> bool:
    if not target.is_dir():
        return False
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir()}
    if present != set(files):
        return False
    try:
        return all(os.path.samefile(target / path, blob_path(h)) for path, h in files.items())
    except OSError:
        return False


def _build(layout: Layout, target: Path, files: Mapping[str, str]) -> None:
    staging = layout.tmp_dir / f"msview-{secrets.token_hex(6)}"
    try:
        durable.make_dirs(staging)
        for path, blob_hex in files.items():
            dest = staging / path
            durable.make_dirs(dest.parent)
            os.link(layout.blob_path(blob_hex), dest)
        durable.make_dirs(target.parent)
        old = None
        if target.exists():
            old = layout.tmp_dir / f"msold-{secrets.token_hex(6)}"
            os.replace(target, old)
        os.replace(staging, target)
        durable.fsync_dir(target.parent)
        if old is not None:
            durable.remove_tree(old)
    except BaseException:
        durable.remove_tree(staging)
        raise


class ModelScopeView:
    """When the ``modelscope/`` view follows the index: after each change of a modelscope ref
    (``sync``) and at start (``sweep_sync``, which also removes what no ref names)."""

    def __init__(self, layout: Layout, index: Index) -> None:
        self._layout = layout
        self._index = index
        self._lock = threading.Lock()
        self._sync_lock = asyncio.Lock()

    def _sync_sync(self, repo: str, wanted: Snapshots) -> None:
        try:
            with self._lock:
                sync_repo_sync(self._layout, repo, wanted)
        except OSError as e:
            raise durable.wrap_os_error(e, f"building the modelscope view of {repo}") from e

    async def sync(self, manifest: Manifest | None) -> None:
        repo = ms_repo(manifest.ref) if manifest is not None else None
        if repo is None:
            return
        # One sync at a time, each from the index as it is when it starts: the last one wins.
        async with self._sync_lock:
            await asyncio.to_thread(self._sync_sync, repo, desired(self._index, repo))

    def sweep_sync(self) -> None:
        models = cache_root(self._layout) / "models"
        repos = {r for r in (ms_repo(c) for c in self._index.refs) if r is not None}
        if models.is_dir():
            for p in models.iterdir():
                if p.name not in {repo_folder(r) for r in repos}:
                    durable.remove_tree(p)
        for repo in sorted(repos):
            try:
                self._sync_sync(repo, desired(self._index, repo))
            except CachedError as e:
                log.warning("skipping modelscope view that cannot be rebuilt repo=%s reason=%s", repo, e)
                self._index.bad_entries["modelscope_view"] += 1

    def snapshot(self, ref: ModelRef) -> Path | None:
        if ref.kind is not RefKind.MODELSCOPE:
            return None
        return repo_dir(self._layout, ref.repo) / "snapshots" / ref.revision
