"""``file://`` origin: a local or mounted (NFS) file or directory, imported into the store.

The import is a copy (or a reflink clone), never a hardlink to the user's file: a later edit or
chmod of the source must not change the cache. The identity of each file includes its size, mtime
and inode, and ``check_unchanged`` compares them again after the copy, so a file rewritten during
the import fails the fetch instead of yielding a mixed blob.

What may be imported (``FilePolicy``): only files whose real path (symlinks resolved) lies under
one of ``origins.file.allowed_roots`` -- none by default -- and never the daemon's own secrets
(config, token and TLS files, by path and by inode, so a hardlink does not help) nor anything
under its cache directory. On top of that, ``authorize`` checks at the API edge that the caller
could read every file itself, by the owner/group/other mode bits of the file (r) and of every
directory on its way from ``/`` (x). POSIX ACLs and capabilities are not evaluated: the check errs
on the side of refusing. Root may import anything under the roots; an unidentified caller only
what "other" may read. ``resolve`` imports only file versions (path, inode, size, mtime) that an
``authorize`` call approved, so swapping a file between the check and the copy fails the import.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import os
import stat
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cached.errors import CachedError, OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.origins import Resolution, stream_by_ranges
from cached.rangeio import Sink
from cached.types import ModelRef, OriginFile, validate_file_path

MAX_FILES = 100_000
MAX_APPROVED = 2 * MAX_FILES  # file versions remembered as approved (bounded memory)


class FileNotAllowed(CachedError):
    """A file:// import this daemon or this caller may not make (HTTP 403)."""

    code = "file_not_allowed"


@dataclass(frozen=True, slots=True, kw_only=True)
class FilePolicy:
    """Where ``file://`` imports may come from (real paths, resolved once at start)."""

    roots: tuple[str, ...] = ()
    protected_files: frozenset[str] = frozenset()
    protected_inodes: frozenset[tuple[int, int]] = frozenset()
    protected_dirs: tuple[str, ...] = ()

    @classmethod
    def build(
        cls, roots: Iterable[Path], *, secrets: Iterable[Path | None] = (), private_dirs: Iterable[Path] = ()
    ) -> FilePolicy:
        files, inodes = set(), set()
        for p in secrets:
            if p is None:
                continue
            real = os.path.realpath(p)
            files.add(real)
            try:
                st = os.stat(real)
                inodes.add((st.st_dev, st.st_ino))
            except OSError:
                pass
        return cls(
            roots=tuple(os.path.realpath(r) for r in roots),
            protected_files=frozenset(files),
            protected_inodes=frozenset(inodes),
            protected_dirs=tuple(os.path.realpath(d) for d in private_dirs),
        )

    def check_path(self, real: str, shown: str) -> None:
        """Raise FileNotAllowed unless real path ``real`` is under a root and not the daemon's own."""
        if not self.roots:
            raise FileNotAllowed(
                f"{shown}: file:// imports are off on this daemon; the operator allows a directory "
                "with --allow-file-root DIR (origins.file.allowed_roots)"
            )
        if not any(_under(real, r) for r in self.roots):
            raise FileNotAllowed(
                f"{shown}: not under an allowed file root ({', '.join(self.roots)}); "
                "the operator adds one with --allow-file-root DIR"
            )
        if real in self.protected_files or any(_under(real, d) for d in self.protected_dirs):
            raise FileNotAllowed(f"{shown}: this daemon's own configuration, secrets and store are never imported")

    def check(self, real: str, st: os.stat_result, shown: str) -> None:
        """``check_path``, and not a hardlink of one of the daemon's secrets either."""
        self.check_path(real, shown)
        if (st.st_dev, st.st_ino) in self.protected_inodes:
            raise FileNotAllowed(f"{shown}: this daemon's own configuration, secrets and store are never imported")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def may_read(uid: int | None, gids: frozenset[int], real: str, st: os.stat_result, dir_mode: DirModes) -> bool:
    """Could ``uid`` (None: an unknown user, "other" bits only) read the file at real path ``real``?"""
    if uid == 0:
        return True
    if not _allows(uid, gids, st, stat.S_IROTH, stat.S_IRGRP, stat.S_IRUSR):
        return False
    parent = os.path.dirname(real)
    while True:
        dst = dir_mode.stat(parent)
        if dst is None or not _allows(uid, gids, dst, stat.S_IXOTH, stat.S_IXGRP, stat.S_IXUSR):
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _allows(uid: int | None, gids: frozenset[int], st: os.stat_result, other: int, group: int, owner: int) -> bool:
    # The kernel's order: the owner class applies to the owner even if "other" would allow more.
    if uid is not None and st.st_uid == uid:
        return bool(st.st_mode & owner)
    if uid is not None and st.st_gid in gids:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


class DirModes:
    """stat() of directories, memoized for one walk."""

    def __init__(self) -> None:
        self._seen: dict[str, os.stat_result | None] = {}

    def stat(self, path: str) -> os.stat_result | None:
        if path not in self._seen:
            try:
                self._seen[path] = os.stat(path)
            except OSError:
                self._seen[path] = None
        return self._seen[path]


def _identity(path: str, st: os.stat_result) -> str:
    return f"file|{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}:{st.st_ino}"


def _os_error(e: OSError, path: str) -> OriginError:
    if e.errno == errno.ENOENT:
        return OriginNotFound(f"{path}: no such file or directory", status=404)
    if e.errno in (errno.EACCES, errno.EPERM):
        return OriginDenied(f"{path}: permission denied", status=403)
    # EIO, ESTALE, ETIMEDOUT on NFS are transient from our point of view.
    return OriginError(
        f"{path}: {e.strerror}", retryable=e.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN)
    )


class LocalOrigin:
    """``policy`` None: no restriction and no approval (component tests of the copy itself)."""

    def __init__(self, policy: FilePolicy | None = None) -> None:
        self._policy = policy
        self._approved: collections.OrderedDict[str, None] = collections.OrderedDict()  # identities
        # Every prefetch of a file:// model waits for this check, even of a ready one. On threads of
        # its own it never queues behind the store's fsyncs in the default executor: there it
        # doubled the prefetch latency of scripts/bench_load.py (200 launchers).
        self._checks = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="file-check")

    def close(self) -> None:
        self._checks.shutdown(wait=False, cancel_futures=True)

    async def authorize(self, ref: ModelRef, *, uid: int | None, gids: frozenset[int] = frozenset()) -> None:
        """At the API edge: may this caller import ``ref``? Raise FileNotAllowed naming the file."""
        loop = asyncio.get_running_loop()
        resolution = await loop.run_in_executor(self._checks, self._resolve_sync, ref.path, (uid, gids))
        for f in resolution.files:
            self._approved[f.identity] = None
            self._approved.move_to_end(f.identity)
        while len(self._approved) > MAX_APPROVED:
            self._approved.popitem(last=False)

    async def resolve(self, ref: ModelRef) -> Resolution:
        resolution = await asyncio.to_thread(self._resolve_sync, ref.path, None)
        if self._policy is not None:
            for f in resolution.files:
                if f.identity not in self._approved:
                    raise OriginChanged(f"{f.locator}: changed since the caller's access was checked; prefetch again")
        return resolution

    def _check(
        self, path: str, st: os.stat_result, caller: tuple[int | None, frozenset[int]] | None, dirs: DirModes
    ) -> None:
        if self._policy is None:
            return
        real = os.path.realpath(path)
        self._policy.check(real, st, path)
        if caller is not None and not may_read(caller[0], caller[1], real, st, dirs):
            who = "an unidentified caller (only world-readable files)" if caller[0] is None else f"uid {caller[0]}"
            raise FileNotAllowed(
                f"{path}: {who} may not read this file (by its mode bits and its directories'), so the daemon will not import it"
            )

    def _resolve_sync(self, root: str, caller: tuple[int | None, frozenset[int]] | None) -> Resolution:
        dirs = DirModes()
        if self._policy is not None:
            # Before any stat: outside the roots, not even whether a path exists is told.
            self._policy.check_path(os.path.realpath(root), root)
        try:
            st = os.stat(root)
        except OSError as e:
            raise _os_error(e, root) from None
        if stat.S_ISREG(st.st_mode):
            self._check(root, st, caller, dirs)
            name = os.path.basename(root)
            return Resolution(
                files=(OriginFile(path=name, size=st.st_size, identity=_identity(root, st), locator=root),)
            )
        if not stat.S_ISDIR(st.st_mode):
            raise OriginError(f"{root}: not a regular file or directory")
        files: list[OriginFile] = []
        try:
            for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
                dirnames.sort()  # os.walk does not descend into symlinked directories
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    try:
                        fst = os.stat(full)
                    except FileNotFoundError:
                        continue  # dangling symlink
                    if not stat.S_ISREG(fst.st_mode):
                        continue
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    try:
                        validate_file_path(rel)
                    except ValueError:
                        continue
                    self._check(full, fst, caller, dirs)
                    files.append(OriginFile(path=rel, size=fst.st_size, identity=_identity(full, fst), locator=full))
                    if len(files) > MAX_FILES:
                        raise OriginError(f"{root}: more than {MAX_FILES} files")
        except OSError as e:
            raise _os_error(e, root) from None
        if not files:
            raise OriginNotFound(f"{root}: directory holds no regular files", status=404)
        return Resolution(files=tuple(files))

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """The file ``path`` under the ref's own path, as it is on disk now."""
        return await asyncio.to_thread(self._file_for_sync, ref.path, path)

    def _file_for_sync(self, root: str, path: str) -> OriginFile:
        if self._policy is not None:
            # A repair reads the origin file again: the roots and the daemon's own files still apply.
            self._policy.check_path(os.path.realpath(root), root)
        try:
            validate_file_path(path)
            is_file = stat.S_ISREG(os.stat(root).st_mode)
            if is_file and path != os.path.basename(root):
                raise OriginError(f"{root}: {path!r} is not this file", retryable=False)
            full = root if is_file else os.path.join(root, path)
            st = os.stat(full)
            self._check(full, st, None, DirModes())
            return OriginFile(path=path, size=st.st_size, identity=_identity(full, st), locator=full)
        except ValueError as e:
            raise OriginError(f"{root}: bad file path {path!r}: {e}", retryable=False) from None
        except OSError as e:
            raise _os_error(e, root) from None

    def supports_ranges(self, file: OriginFile) -> bool:
        return True

    def local_path(self, file: OriginFile) -> str | None:
        if self._policy is not None and file.identity not in self._approved:
            return None  # not a file version a caller was checked for: no reflink shortcut
        return file.locator

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._pread, file.locator, offset, length)

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        """The range handed to ``sink`` in one batch: a local read has nothing to overlap."""

        def read_and_sink() -> None:
            sink(memoryview(self._pread(file.locator, offset, length)), offset)

        await asyncio.to_thread(read_and_sink)

    def _pread(self, path: str, offset: int, length: int) -> bytes:
        try:
            with open(path, "rb") as f:
                if self._policy is not None:
                    # The open file, not the name: what a swapped symlink points to is checked too.
                    self._policy.check(os.path.realpath(f"/proc/self/fd/{f.fileno()}"), os.fstat(f.fileno()), path)
                data = os.pread(f.fileno(), length, offset)
        except OSError as e:
            raise _os_error(e, path) from None
        if len(data) != length:
            raise OriginChanged(f"{path}: file shrank during import")
        return data

    def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        return stream_by_ranges(self, file)

    async def check_unchanged(self, file: OriginFile) -> None:
        try:
            st = await asyncio.to_thread(os.stat, file.locator)
        except OSError as e:
            raise _os_error(e, file.locator) from None
        if _identity(file.locator, st) != file.identity:
            raise OriginChanged(f"{file.locator}: changed while it was being imported; prefetch again")

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        return None  # the bytes were hashed as they were read; check_unchanged covers edits


def _raise(e: OSError) -> None:
    raise e
