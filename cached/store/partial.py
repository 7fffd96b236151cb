"""Blobs in progress: pieces written in place at their offsets, recorded only once verified.

``partial/<key>`` holds the bytes; ``partial/<key>.pieces`` is an append-only log of (index,
BLAKE3 digest) records, written after the piece's bytes. On reopen every recorded piece is hashed
again before it counts, so a crash, a power cut or a torn record costs at most the pieces that were
in flight and never lets an unverified byte through. ``finalize`` turns a complete partial into an
immutable blob. The same log format, in piece order, is the blob's ``.pieces`` sidecar.

Methods ending in ``_sync`` block (disk I/O, hashing) and are called through ``asyncio.to_thread``.
This module does not decide where bytes come from; ``cached.transfer`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cached.errors import IntegrityError, StoreError
from cached.store import durable
from cached.types import BlobId, hash_piece, piece_count, piece_span

_MAGIC = b"CPL1"
_RECORD = struct.Struct("<I32s")
_LOCK_STRIPES = 64
_WRITE_SLICE = 128 << 10  # large pwrites cost far more kernel time per byte (docs/benchmarks.md)


@dataclass(frozen=True, slots=True, kw_only=True)
class PieceLogHeader:
    size: int
    piece_size: int
    identity_key: str


def read_piece_log(path: Path) -> tuple[PieceLogHeader, dict[int, bytes]]:
    """Header and records; a torn trailing record is ignored. Raises StoreError if unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    return decode_piece_log(raw, str(path))


def decode_piece_log(raw: bytes, path: str = "piece log") -> tuple[PieceLogHeader, dict[int, bytes]]:
    if len(raw) < 8 or raw[:4] != _MAGIC:
        raise StoreError(f"{path}: not a piece log")
    (hlen,) = struct.unpack_from("<I", raw, 4)
    try:
        h = json.loads(raw[8 : 8 + hlen])
        header = PieceLogHeader(
            size=int(h["size"]), piece_size=int(h["piece_size"]), identity_key=str(h.get("identity_key", ""))
        )
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: bad header: {e}") from None
    if header.size < 0 or header.piece_size <= 0:
        raise StoreError(f"{path}: bad header values")
    n = piece_count(header.size, header.piece_size)
    records: dict[int, bytes] = {}
    body = raw[8 + hlen :]
    for off in range(0, len(body) - _RECORD.size + 1, _RECORD.size):
        index, digest = _RECORD.unpack_from(body, off)
        if index < n:
            records[index] = digest
    return header, records


def encode_piece_log(header: PieceLogHeader, records: dict[int, bytes]) -> bytes:
    h = json.dumps({"size": header.size, "piece_size": header.piece_size, "identity_key": header.identity_key}).encode()
    out = bytearray(_MAGIC + struct.pack("<I", len(h)) + h)
    for index in sorted(records):
        out += _RECORD.pack(index, records[index])
    return bytes(out)


class PartialBlob:
    """One blob being assembled. Shared by every fetcher of the same key (see Store.open_partial)."""

    def __init__(
        self,
        *,
        key: str,
        header: PieceLogHeader,
        data_path: Path,
        log_path: Path,
        on_piece: Callable[[int, bytes], None] = lambda index, digest: None,
    ) -> None:
        self.key = key
        self.header = header
        self.data_path = data_path
        self.log_path = log_path
        self.done: dict[int, bytes] = {}
        self._fd = -1
        self._log_fd = -1
        self._log_lock = threading.Lock()
        # Worker threads may still be writing when the coroutine that started them is cancelled;
        # closing the fds under them could let a reused fd number receive their bytes. So every
        # blocking operation is counted, and close waits for the count to drop to zero.
        self._ops = 0
        self._closing = False
        # Called (from a worker thread) after each piece is recorded.
        self._on_piece = on_piece
        self._cond = threading.Condition()
        # A recorded piece's bytes are final: peers may already be reading them. A copy that is
        # still streaming into the same piece (endgame) takes the piece's lock for each write and
        # stops once the piece is done; recording takes the same lock.
        self._piece_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        # Bytes of each piece written by its current attempt and not verified yet (progress as
        # bytes arrive; never counted as done). An attempt starts at its piece's first byte.
        self._arriving: dict[int, int] = {}

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        with self._cond:
            if self._closing or self._fd < 0:
                raise StoreError(f"partial {self.key[:16]} is closed")
            self._ops += 1
        try:
            yield
        finally:
            with self._cond:
                self._ops -= 1
                self._cond.notify_all()

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def piece_size(self) -> int:
        return self.header.piece_size

    @property
    def pieces(self) -> int:
        return piece_count(self.header.size, self.header.piece_size)

    @property
    def bytes_done(self) -> int:
        return sum(piece_span(i, self.size, self.piece_size)[1] for i in self.done)

    @property
    def bytes_arriving(self) -> int:
        """Bytes written by pieces' current attempts, not verified yet (each capped at its piece)."""
        pending = list(self._arriving.items())  # a copy: worker threads change it meanwhile
        return sum(min(n, piece_span(i, self.size, self.piece_size)[1]) for i, n in pending if i not in self.done)

    def missing(self) -> list[int]:
        return [i for i in range(self.pieces) if i not in self.done]

    @property
    def complete(self) -> bool:
        return len(self.done) == self.pieces

    # --- blocking half -------------------------------------------------------------------------

    def open_sync(self) -> int:
        """Create, or reopen and re-verify. Returns the number of pieces kept from a previous run."""
        try:
            if self.data_path.exists() and self.log_path.exists():
                try:
                    header, records = read_piece_log(self.log_path)
                except StoreError:
                    header, records = None, {}
                if header == self.header and os.path.getsize(self.data_path) == self.size:
                    self._fd = os.open(self.data_path, os.O_RDWR)
                    self.done = self._reverify(records)
                    # Compact: the log now lists exactly the pieces that verified.
                    durable.atomic_write(self.log_path, encode_piece_log(self.header, self.done))
                    self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
                    return len(self.done)
            self.data_path.unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, durable.FILE_MODE)
            durable.preallocate(self._fd, self.size)
            durable.atomic_write(self.log_path, encode_piece_log(self.header, {}))
            self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
            return 0
        except OSError as e:
            self.close_sync()
            self.data_path.unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)
            raise durable.wrap_os_error(e, f"creating partial blob ({self.size} bytes)") from e

    def _reverify(self, records: dict[int, bytes]) -> dict[int, bytes]:
        kept: dict[int, bytes] = {}
        for index, digest in records.items():
            off, length = piece_span(index, self.size, self.piece_size)
            if hash_piece(os.pread(self._fd, length, off)) == digest:
                kept[index] = digest
        return kept

    def write_piece_sync(
        self, index: int, data: bytes | bytearray | memoryview, expected: bytes | None = None
    ) -> bytes | None:
        """Verify ``data`` (against ``expected`` when the digest is known), write it, record it.
        Returns the digest, or None if another copy of the piece was recorded first (endgame)."""
        if not 0 <= index < self.pieces:
            raise IntegrityError(f"piece index {index} out of range (0..{self.pieces - 1})")
        off, length = piece_span(index, self.size, self.piece_size)
        if len(data) != length:
            raise IntegrityError(f"piece {index}: got {len(data)} bytes, expected {length}")
        digest = hash_piece(data)
        if expected is not None and digest != expected:
            raise IntegrityError(f"piece {index}: BLAKE3 mismatch")
        if index in self.done:
            return None
        with self._op(), self._piece_lock(index):
            if index in self.done:
                return None
            self._pwrite_all(data, off)
            if not self._record(index, digest):
                return None
        return digest

    def write_at_sync(self, data: bytes | bytearray | memoryview, offset: int, index: int) -> bool:
        """Bytes of piece ``index`` still arriving; nothing is recorded until ``record_sync``.
        False (nothing written) once the piece is done: the caller should stop.

        Only one unverified stream may write a given piece at a time (the scheduler buffers a
        second, endgame copy in memory): the digest it records must be of the bytes on disk."""
        with self._op(), self._piece_lock(index):
            if index in self.done:
                return False
            self._pwrite_all(data, offset)
            start = index * self.piece_size
            self._arriving[index] = len(data) + (0 if offset == start else self._arriving.get(index, 0))
            return True

    def record_sync(self, index: int, digest: bytes) -> bool:
        """Mark a piece whose bytes were written with ``write_at_sync`` and whose digest the
        caller checked. False if another copy was recorded first."""
        with self._op(), self._piece_lock(index):
            return self._record(index, digest)

    def _piece_lock(self, index: int) -> threading.Lock:
        return self._piece_locks[index % _LOCK_STRIPES]

    def adopt_piece_sync(self, index: int, expected: bytes | None = None) -> bytes:
        """Hash a piece already present in the data file (after a reflink clone) and record it."""
        off, length = piece_span(index, self.size, self.piece_size)
        with self._op():
            digest = hash_piece(os.pread(self._fd, length, off))
            if expected is not None and digest != expected:
                raise IntegrityError(f"piece {index}: BLAKE3 mismatch")
            self._record(index, digest)
        return digest

    def _pwrite_all(self, data: bytes | bytearray | memoryview, off: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view[:_WRITE_SLICE], off)
                view = view[n:]
                off += n
        except OSError as e:
            raise durable.wrap_os_error(e, "writing a piece") from e

    def _record(self, index: int, digest: bytes) -> bool:
        # O_APPEND writes of 36 bytes are atomic; the lock keeps ``done`` and the log in step.
        with self._log_lock:
            if index in self.done:
                return False  # the other copy of an endgame pair got here first
            os.write(self._log_fd, _RECORD.pack(index, digest))
            self.done[index] = digest
            self._arriving.pop(index, None)
        self._on_piece(index, digest)
        return True

    def reader_fd(self) -> int:
        """A descriptor of the data file for a reader of verified pieces. It is the same inode the
        partial writes (no path to race with a discard and a new partial of the same key), and it
        stays valid after the partial is closed or finalized. StoreError once closed."""
        with self._op():
            return os.dup(self._fd)

    def clone_from_sync(self, src_fd: int) -> bool:
        with self._op():
            return durable.try_reflink(src_fd, self._fd)

    def finalize_sync(self, blob_path: Path, sidecar_path: Path) -> BlobId:
        """fsync, name by piece root, publish sidecar then blob (0440). The partial is gone after."""
        if not self.complete:
            raise StoreError(f"partial {self.key} is not complete ({len(self.done)}/{self.pieces} pieces)")
        digests = [self.done[i] for i in range(self.pieces)]
        blob_id = BlobId.compute(self.size, self.piece_size, digests)
        try:
            os.fsync(self._fd)
            self.close_sync()
            durable.make_dirs(blob_path.parent)
            # Sidecar first: a blob without its sidecar is treated as debris at startup.
            durable.atomic_write(sidecar_path, encode_piece_log(self.header, self.done), mode=durable.BLOB_MODE)
            os.chmod(self.data_path, durable.BLOB_MODE)
            os.replace(self.data_path, blob_path)
            durable.fsync_dir(blob_path.parent)
            self.log_path.unlink(missing_ok=True)
            durable.fsync_dir(self.data_path.parent)
        except OSError as e:
            raise durable.wrap_os_error(e, "publishing a blob") from e
        return blob_id

    def close_sync(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.wait_for(lambda: self._ops == 0)
        for attr in ("_fd", "_log_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def discard_sync(self) -> None:
        self.close_sync()
        self.data_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
