"""The ``hf/`` view: the store's hf:// models laid out as a Hugging Face hub cache.

``HF_HUB_CACHE=<cache_dir>/hf HF_HUB_OFFLINE=1`` lets transformers, vLLM or huggingface_hub
load them unchanged (HF.md §3). Per repo: ``blobs/<etag>`` are hardlinks to the store's blobs
(no second copy), ``snapshots/<commit>/<path>`` relative symlinks to them, ``trees/<commit>.json``
(so 1.x clients can snapshot_download a commit offline), and ``refs/<revision>`` holding the
40-hex commit with no newline, written last. Nothing else is ever written under ``hf/``.

``sync_repo_sync`` makes one repo folder match a desired state: additions in publish order
(blobs, snapshots, trees, refs last), removals in reverse (refs first, blobs last), so a client
resolving mid-change finds the old revision or the new one, never a dangling half.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cached.store import durable
from cached.types import MAX_NAME_BYTES

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class HfFile:
    path: str
    size: int
    blob_hex: str  # the store's blob
    git_sha1: str
    sha256: str | None  # LFS files only


@dataclass(frozen=True, slots=True, kw_only=True)
class HfRevision:
    revision: str  # what the ref named: a branch, tag, refs/pr/N or a commit
    commit: str
    files: tuple[HfFile, ...]
    named: bool = True  # False for a retained old revision: its snapshot stays, no refs entry


def repo_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def etag(f: HfFile) -> str:
    return f.sha256 or f.git_sha1


def tree_json(files: Sequence[HfFile]) -> bytes:
    out: dict[str, dict[str, object]] = {}
    for f in sorted(files, key=lambda f: f.path):
        entry: dict[str, object] = {"size": f.size, "blob_id": f.git_sha1}
        if f.sha256:
            entry.update(lfs_sha256=f.sha256, lfs_size=f.size)
        out[f.path] = entry
    return json.dumps({"format_version": 1, "files": out}, sort_keys=True).encode()


def sync_repo_sync(root: Path, repo: str, revisions: Sequence[HfRevision], blob_path: Callable[[str], Path]) -> None:
    top = root / repo_folder(repo)
    revisions = [r for r in revisions if _fits_on_disk(repo, r)]
    if not revisions:
        durable.remove_tree(top)
        return
    # Files of one commit from several refs (different include patterns) are merged.
    commits: dict[str, dict[str, HfFile]] = {}
    for r in revisions:
        commits.setdefault(r.commit, {}).update({f.path: f for f in r.files})
    refs = {r.revision: r.commit for r in revisions if r.named and not _COMMIT.match(r.revision)}
    blobs = {etag(f): f.blob_hex for files in commits.values() for f in files.values()}

    for d in ("blobs", "snapshots", "refs", "trees"):
        durable.make_dirs(top / d)
    for name, blob_hex in blobs.items():
        _link_blob(top / "blobs" / name, blob_path(blob_hex))
    for commit, files in commits.items():
        snap = top / "snapshots" / commit
        for f in files.values():
            dest = snap / f.path
            depth = f.path.count("/")
            _symlink(dest, "../" * (depth + 2) + "blobs/" + etag(f))
        _prune_snapshot(snap, set(files))
        tree = top / "trees" / f"{commit}.json"
        data = tree_json(list(files.values()))
        if not tree.exists() or tree.read_bytes() != data:
            durable.atomic_write(tree, data)
    for revision, commit in refs.items():
        path = top / "refs" / revision
        if not path.exists() or path.read_text() != commit:
            durable.atomic_write(path, commit.encode())  # 40 hex, no newline (HF.md §1 rule 3)

    # Removals, in reverse: refs, snapshots, trees, blobs.
    for path in sorted((top / "refs").rglob("*"), reverse=True):
        rel = path.relative_to(top / "refs").as_posix()
        if path.is_file() and rel not in refs:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for snap in (top / "snapshots").iterdir():
        if snap.name not in commits:
            durable.remove_tree(snap)
    for tree in (top / "trees").iterdir():
        if tree.name.removesuffix(".json") not in commits:
            tree.unlink()
    for blob in (top / "blobs").iterdir():
        if blob.name not in blobs:
            blob.unlink()


def _fits_on_disk(repo: str, r: HfRevision) -> bool:
    """A revision whose names cannot be files here is left out of the view, not allowed to fail
    the whole repo: the commit names snapshots/<commit>, the revision names refs/<revision>."""
    segments = r.revision.split("/")
    if _COMMIT.match(r.commit) and all(
        s not in ("", ".", "..") and len(s.encode()) <= MAX_NAME_BYTES for s in segments
    ):
        return True
    log.warning(
        "leaving out of the hf view repo=%s revision=%.64r commit=%.64r reason=not a safe file name",
        repo,
        r.revision,
        r.commit,
    )
    return False


def _link_blob(dest: Path, blob: Path) -> None:
    try:
        if os.path.samefile(dest, blob):
            return
    except OSError:
        pass
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    os.link(blob, tmp)
    os.replace(tmp, dest)


def _symlink(dest: Path, target: str) -> None:
    if dest.is_symlink() and os.readlink(dest) == target:
        return
    durable.make_dirs(dest.parent)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def _prune_snapshot(snap: Path, keep: set[str]) -> None:
    for path in sorted(snap.rglob("*"), reverse=True):
        rel = path.relative_to(snap).as_posix()
        if path.is_symlink() or path.is_file():
            if rel not in keep:
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
