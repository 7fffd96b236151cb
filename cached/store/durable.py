"""Blocking file primitives that make the store crash-safe; callers run them off the event loop.

Every publish is "write a temp file in the same directory, fsync it, rename over the target, fsync
the directory": after a crash a reader sees the old file or the new one, never half of either.
No locks anywhere (flock is unreliable on NFS); uniqueness comes from per-attempt temp names.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
from pathlib import Path

from cached.errors import StoreError, StoreFullError

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)

# The store is readable by the daemon's group (launchers join it; docs/install.md), writable
# only by the daemon, and closed to everyone else. These are set explicitly, whatever the
# process umask: a 0077 umask must not hide models from launchers, nor a 0002 one let a
# launcher rename a view's files.
BLOB_MODE = 0o440  # published blobs, their sidecars, manifests: immutable, hardlinked into views
FILE_MODE = 0o640  # files the daemon rewrites in place (refs, claims, the hf view's refs/trees)
DIR_MODE = 0o750


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """``mkdir -p`` whose new directories get exactly ``mode``; existing ones are left alone."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made by a concurrent caller, with the same mode
        os.chmod(d, mode)  # mkdir's mode is filtered by the umask


def atomic_write(target: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Publish ``data`` at ``target`` atomically and durably."""
    make_dirs(target.parent)
    tmp = temp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise wrap_os_error(e, f"writing {target}") from e
    fsync_dir(target.parent)


def remove_tree(path: Path) -> None:
    """rmtree that also copes with read-only files and dirs made read-only."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_file() or path.is_symlink():
        path.unlink(missing_ok=True)
        return

    def onerror(func, p, exc_info):  # noqa: ANN001 - shutil's callback signature
        if isinstance(exc_info[1], FileNotFoundError):
            return
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    # onerror rather than onexc: the latter only exists from Python 3.12.
    shutil.rmtree(path, onerror=onerror)


def try_reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone src into dst sharing extents (btrfs, XFS, bcachefs). False where unsupported."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError:
        return False


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes so that a full disk fails now, with a clear error, not mid-download."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            os.ftruncate(fd, size)  # filesystems without fallocate (some NFS): sparse file
        else:
            raise


def wrap_os_error(e: OSError, doing: str) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(f"no space left on the cache filesystem while {doing}", needed_bytes=0, available_bytes=0)
    return StoreError(f"{doing}: {e.strerror or e}")
