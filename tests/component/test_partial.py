"""PartialBlob on real files: verified writes, crash recovery from the piece log, finalize."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from cached.errors import IntegrityError, StoreError
from cached.store.partial import PartialBlob, PieceLogHeader, read_piece_log
from cached.types import BlobId, hash_piece, piece_span
from tests.support.origin import write_random_file

PIECE = 65536
SIZE = 5 * PIECE + 1234  # six pieces, the last one short


def make_partial(root: Path, *, size: int = SIZE, key: str = "k1") -> PartialBlob:
    header = PieceLogHeader(size=size, piece_size=PIECE, identity_key="test|identity")
    return PartialBlob(key=key, header=header, data_path=root / key, log_path=root / f"{key}.pieces")


def piece_of(src: bytes, index: int, size: int = SIZE) -> bytes:
    off, length = piece_span(index, size, PIECE)
    return src[off : off + length]


@pytest.fixture
def source(tmp_path: Path) -> bytes:
    return write_random_file(tmp_path / "src.bin", SIZE, seed=7).read_bytes()


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "partial"
    d.mkdir()
    return d


async def test_pieces_land_at_their_offsets_and_are_recorded(pdir: Path, source: bytes) -> None:
    p = make_partial(pdir)
    assert await asyncio.to_thread(p.open_sync) == 0
    try:
        assert os.path.getsize(p.data_path) == SIZE  # preallocated
        for index in (4, 1, 5):  # out of order, including the short last piece
            digest = await asyncio.to_thread(p.write_piece_sync, index, piece_of(source, index))
            assert digest == hash_piece(piece_of(source, index))
        assert sorted(p.done) == [1, 4, 5]
        assert p.missing() == [0, 2, 3]
        assert p.bytes_done == 2 * PIECE + 1234
        assert not p.complete
        data = p.data_path.read_bytes()
        for index in (1, 4, 5):
            off, length = piece_span(index, SIZE, PIECE)
            assert data[off : off + length] == piece_of(source, index)
        header, records = read_piece_log(p.log_path)
        assert header == p.header
        assert records == {i: hash_piece(piece_of(source, i)) for i in (1, 4, 5)}
    finally:
        p.close_sync()


async def test_wrong_expected_digest_raises_and_records_nothing(pdir: Path, source: bytes) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    try:
        good = hash_piece(piece_of(source, 2))
        wrong = hash_piece(piece_of(source, 3))
        with pytest.raises(IntegrityError, match="piece 2"):
            await asyncio.to_thread(p.write_piece_sync, 2, piece_of(source, 2), wrong)
        assert p.done == {}
        _, records = read_piece_log(p.log_path)
        assert records == {}
        off, length = piece_span(2, SIZE, PIECE)
        assert p.data_path.read_bytes()[off : off + length] != piece_of(source, 2)  # no bytes written either

        # Wrong length and out-of-range index are refused the same way.
        with pytest.raises(IntegrityError):
            await asyncio.to_thread(p.write_piece_sync, 2, piece_of(source, 2)[:-1])
        with pytest.raises(IntegrityError):
            await asyncio.to_thread(p.write_piece_sync, p.pieces, b"x")
        assert p.done == {}

        # The right digest is accepted.
        await asyncio.to_thread(p.write_piece_sync, 2, piece_of(source, 2), good)
        assert p.done == {2: good}
    finally:
        p.close_sync()


async def test_reopen_after_crash_keeps_only_pieces_that_reverify(pdir: Path, source: bytes) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    for index in (0, 1, 2, 4):
        await asyncio.to_thread(p.write_piece_sync, index, piece_of(source, index))
    p.close_sync()  # crash: fds closed, never finalized

    # Bit rot in recorded piece 1, and a torn half record at the end of the log.
    off, _ = piece_span(1, SIZE, PIECE)
    with open(p.data_path, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0x01]))
    with open(p.log_path, "ab") as f:
        f.write(b"\x03\x00\x00\x00" + b"\xaa" * 14)  # 18 of the 36 bytes of a record for piece 3

    again = make_partial(pdir)
    kept = await asyncio.to_thread(again.open_sync)
    try:
        assert kept == 3
        assert sorted(again.done) == [0, 2, 4]
        assert again.missing() == [1, 3, 5]
        # The log was compacted to exactly the verified pieces, so appends stay aligned.
        _, records = read_piece_log(again.log_path)
        assert sorted(records) == [0, 2, 4]
        # Finish the blob after the resume: every byte must match the source.
        for index in again.missing():
            await asyncio.to_thread(again.write_piece_sync, index, piece_of(source, index))
        assert again.complete
        assert again.data_path.read_bytes() == source
        _, records = read_piece_log(again.log_path)
        assert sorted(records) == list(range(again.pieces))
    finally:
        again.close_sync()


async def test_reopen_with_another_header_starts_over(pdir: Path, source: bytes) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    await asyncio.to_thread(p.write_piece_sync, 0, piece_of(source, 0))
    p.close_sync()

    other = PartialBlob(
        key="k1",
        header=PieceLogHeader(size=SIZE, piece_size=PIECE, identity_key="test|another-version"),
        data_path=p.data_path,
        log_path=p.log_path,
    )
    try:
        assert await asyncio.to_thread(other.open_sync) == 0
        assert other.done == {}
    finally:
        other.close_sync()


async def test_reopen_with_unreadable_log_starts_over(pdir: Path, source: bytes) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    await asyncio.to_thread(p.write_piece_sync, 0, piece_of(source, 0))
    p.close_sync()
    p.log_path.write_bytes(b"garbage")

    again = make_partial(pdir)
    try:
        assert await asyncio.to_thread(again.open_sync) == 0
        header, records = read_piece_log(again.log_path)
        assert header == again.header and records == {}
    finally:
        again.close_sync()


async def test_finalize_publishes_read_only_blob_named_by_its_piece_root(
    pdir: Path, tmp_path: Path, source: bytes
) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    for index in range(p.pieces):
        await asyncio.to_thread(p.write_piece_sync, index, piece_of(source, index))
    digests = [hash_piece(piece_of(source, i)) for i in range(p.pieces)]
    expected_id = BlobId.compute(SIZE, PIECE, digests)
    blob_path = tmp_path / "blobs" / expected_id.hex[:2] / expected_id.hex
    sidecar = blob_path.with_name(f"{expected_id.hex}.pieces")

    blob_id = await asyncio.to_thread(p.finalize_sync, blob_path, sidecar)

    assert blob_id == expected_id
    assert blob_path.read_bytes() == source
    assert stat.S_IMODE(blob_path.stat().st_mode) == 0o440
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o440
    header, records = read_piece_log(sidecar)
    assert header == p.header
    assert [records[i] for i in range(p.pieces)] == digests
    assert not p.data_path.exists() and not p.log_path.exists()


async def test_finalize_refuses_an_incomplete_partial(pdir: Path, tmp_path: Path, source: bytes) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    try:
        await asyncio.to_thread(p.write_piece_sync, 0, piece_of(source, 0))
        with pytest.raises(StoreError, match="not complete"):
            await asyncio.to_thread(p.finalize_sync, tmp_path / "b", tmp_path / "b.pieces")
        assert not (tmp_path / "b").exists() and not (tmp_path / "b.pieces").exists()
        assert p.data_path.exists()
    finally:
        p.close_sync()


async def test_a_stream_still_writing_a_piece_another_copy_recorded_writes_nothing(pdir: Path, source: bytes) -> None:
    """Endgame: once a piece is recorded its bytes are final (peers may be reading them)."""
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    try:
        off, length = piece_span(2, SIZE, PIECE)
        assert await asyncio.to_thread(p.write_at_sync, piece_of(source, 2)[:100], off, 2)
        assert await asyncio.to_thread(p.write_piece_sync, 2, piece_of(source, 2)) is not None
        assert not await asyncio.to_thread(p.write_at_sync, b"\0" * 100, off + 100, 2), (
            "the late stream is told to stop"
        )
        assert not await asyncio.to_thread(p.record_sync, 2, hash_piece(b"other")), "and cannot record"
        assert p.data_path.read_bytes()[off : off + length] == piece_of(source, 2)
        assert p.done[2] == hash_piece(piece_of(source, 2))
    finally:
        await asyncio.to_thread(p.close_sync)


async def test_on_piece_hears_each_recorded_piece_once(pdir: Path, source: bytes) -> None:
    heard: list[tuple[int, bytes]] = []
    header = PieceLogHeader(size=SIZE, piece_size=PIECE, identity_key="test|identity")
    p = PartialBlob(
        key="k1",
        header=header,
        data_path=pdir / "k1",
        log_path=pdir / "k1.pieces",
        on_piece=lambda i, d: heard.append((i, d)),
    )
    await asyncio.to_thread(p.open_sync)
    try:
        await asyncio.to_thread(p.write_piece_sync, 2, piece_of(source, 2))
        assert await asyncio.to_thread(p.write_piece_sync, 2, piece_of(source, 2)) is None  # a second copy
        assert heard == [(2, hash_piece(piece_of(source, 2)))]
    finally:
        await asyncio.to_thread(p.close_sync)


async def test_a_reader_descriptor_outlives_finalize_and_none_is_given_once_closed(
    pdir: Path, tmp_path: Path, source: bytes
) -> None:
    p = make_partial(pdir)
    await asyncio.to_thread(p.open_sync)
    for i in range(p.pieces):
        await asyncio.to_thread(p.write_piece_sync, i, piece_of(source, i))
    fd = p.reader_fd()
    try:
        await asyncio.to_thread(p.finalize_sync, tmp_path / "blob", tmp_path / "blob.pieces")
        assert not p.data_path.exists()
        assert os.pread(fd, SIZE, 0) == source, "the same inode, now the blob"
        assert os.fstat(fd).st_ino == (tmp_path / "blob").stat().st_ino
    finally:
        os.close(fd)
    with pytest.raises(StoreError):
        p.reader_fd()
