"""``file://`` origin: a local or mounted (NFS) file or directory, imported into the store.

The import is a copy (or a reflink clone), never a hardlink to the user's file: a later edit or
chmod of the source must not change the cache. The identity of each file includes its size, mtime
and inode, and ``check_unchanged`` compares them again after the copy, so a file rewritten during
the import fails the fetch instead of yielding a mixed blob.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path
from typing import AsyncIterator, Mapping

from cached.errors import OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.origins import Resolution
from cached.types import ModelRef, OriginFile, validate_file_path

MAX_FILES = 100_000


def _identity(path: str, st: os.stat_result) -> str:
    return f"file|{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}:{st.st_ino}"


def _os_error(e: OSError, path: str) -> OriginError:
    if e.errno == errno.ENOENT:
        return OriginNotFound(f"{path}: no such file or directory", status=404)
    if e.errno in (errno.EACCES, errno.EPERM):
        return OriginDenied(f"{path}: permission denied", status=403)
    # EIO, ESTALE, ETIMEDOUT on NFS are transient from our point of view.
    return OriginError(f"{path}: {e.strerror}", retryable=e.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN))


class LocalOrigin:
    async def resolve(self, ref: ModelRef) -> Resolution:
        return await asyncio.to_thread(self._resolve_sync, ref.path)

    def _resolve_sync(self, root: str) -> Resolution:
        try:
            st = os.stat(root)
        except OSError as e:
            raise _os_error(e, root) from None
        if stat.S_ISREG(st.st_mode):
            name = os.path.basename(root)
            return Resolution(files=(OriginFile(path=name, size=st.st_size, identity=_identity(root, st), locator=root),))
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
        try:
            validate_file_path(path)
            is_file = stat.S_ISREG(os.stat(root).st_mode)
            if is_file and path != os.path.basename(root):
                raise OriginError(f"{root}: {path!r} is not this file", retryable=False)
            full = root if is_file else os.path.join(root, path)
            st = os.stat(full)
            return OriginFile(path=path, size=st.st_size, identity=_identity(full, st), locator=full)
        except ValueError as e:
            raise OriginError(f"{root}: bad file path {path!r}: {e}", retryable=False) from None
        except OSError as e:
            raise _os_error(e, root) from None

    def supports_ranges(self, file: OriginFile) -> bool:
        return True

    def local_path(self, file: OriginFile) -> str | None:
        return file.locator

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._pread, file.locator, offset, length)

    @staticmethod
    def _pread(path: str, offset: int, length: int) -> bytes:
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except OSError as e:
            raise _os_error(e, path) from None
        if len(data) != length:
            raise OriginChanged(f"{path}: file shrank during import")
        return data

    async def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        offset = 0
        while offset < file.size:
            chunk = await self.read_range(file, offset, min(8 << 20, file.size - offset))
            offset += len(chunk)
            yield chunk

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
