"""Reading what may leave the node: only bytes whose pieces verified here.

A complete blob verified as a whole before it was published (its name is the root of its piece
digests), so every byte of it may be read, and the peer API may hand its path to sendfile. A
partial blob's piece counts once its digest was recorded (``PartialBlob.done``); a recorded
piece's bytes never change again, so a check made before a read still holds during it.

A ``VerifiedFile`` holds its own descriptor: a partial that is finalized (its inode becomes the
blob) or discarded while a reader streams from it still reads the same bytes, and so does one of a
blob evicted meanwhile. Reads block (pread) and run in a worker thread; a complete blob's descriptor
may also go to sendfile (``fileno``). This module does not parse Range headers (``cached.ranges``) or decide
what to send (the API does).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping

from cached.errors import IntegrityError, StoreError


class VerifiedFile:
    """One open blob (``done`` None: all of it verified) or partial blob (pieces in ``done``)."""

    def __init__(self, *, fd: int, size: int, piece_size: int = 0, done: Mapping[int, bytes] | None = None) -> None:
        self._fd = fd
        self.size = size
        self.piece_size = piece_size  # of a partial; a complete blob needs none
        self._done = done  # the partial's live map: pieces only ever join it
        # A read may still run in a worker thread when the coroutine that started it is cancelled;
        # closing the fd under it could let a reused fd number hand it another file's bytes. So
        # the last read out closes a descriptor that was closed while it ran.
        self._lock = threading.Lock()
        self._reads = 0
        self._closing = False

    @property
    def complete(self) -> bool:
        return self._done is None

    def verified(self, start: int, end: int) -> bool:
        """Whether every byte ``start``..``end`` (inclusive, as HTTP counts) verified here."""
        if start < 0 or end >= self.size:
            return False
        if self._done is None:
            return True
        done = self._done
        return all(i in done for i in range(start // self.piece_size, end // self.piece_size + 1))

    def verified_end(self, pos: int, stop: int) -> int:
        """Where the run of verified bytes that starts at ``pos`` ends (exclusive), at most ``stop``;
        ``pos`` itself when the byte at ``pos`` is not verified."""
        stop = min(stop, self.size)
        if self._done is None:
            return max(pos, stop)
        i = pos // self.piece_size
        while i * self.piece_size < stop and i in self._done:
            i += 1
        return max(pos, min(stop, i * self.piece_size))

    def read_sync(self, pos: int, n: int) -> bytes:
        """Bytes [pos, pos+n) (fewer only at the end of a complete blob). Blocks."""
        if n <= 0:
            return b""
        if self._done is not None and not self.verified(pos, pos + n - 1):
            raise IntegrityError(f"bytes {pos}-{pos + n - 1} are not verified here")
        with self._lock:
            if self._closing:
                raise StoreError("verified file is closed")
            self._reads += 1
        try:
            return os.pread(self._fd, n, pos)
        finally:
            with self._lock:
                self._reads -= 1
                if self._closing and not self._reads:
                    self._close_fd()

    async def read(self, pos: int, n: int) -> bytes:
        return await asyncio.to_thread(self.read_sync, pos, n)

    def fileno(self) -> int:
        """The descriptor of a complete blob, for the kernel to send from (``loop.sendfile``, which
        runs on the event loop thread, so no worker read can outlive a close). A partial's is never
        handed out: only its verified pieces may be read, and the kernel would not check."""
        if self._done is not None:
            raise StoreError("a partial blob is read through its verified pieces, not sent whole")
        if self._fd < 0 or self._closing:
            raise StoreError("verified file is closed")
        return self._fd

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if not self._reads:
                self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> VerifiedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
