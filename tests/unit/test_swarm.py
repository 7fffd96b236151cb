"""Where a blob's pieces may come from (cached/transfer/sources.py), over a fake peer directory.

Origin single-flight: among the live nodes that want the same origin file, each piece is read from
the origin by exactly one of them, its rendezvous owner; a dead owner's pieces pass to the next in
rank, a stalled owner (no new piece for ``stall_timeout_s``, on an injected clock) releases them,
and nobody reads the origin during the grace period while peers are alive, nor at all while a live
peer holds the complete blob. A finished blob's piece table is accepted only if it hashes to the
blob id.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cached.peers.holdings import HoldingsView
from cached.placement import rank
from cached.store.partial import PartialBlob, PieceLogHeader, decode_piece_log, encode_piece_log
from cached.transfer.sources import Swarm, parse_piece_table
from cached.types import piece_count

KEY = "k" * 64
PIECE = 1 << 20
SIZE = 64 * PIECE + 123
PIECES = piece_count(SIZE, PIECE)
DIGEST = "d" * 64
NODES = ["n0", "n1", "n2", "n3"]
BLOB = "b" * 64


class FakeDirectory:
    """A ``PeerDirectory`` without sockets: gossip's view and membership, set by hand."""

    def __init__(self, me: str, alive: list[str], view: HoldingsView) -> None:
        self.me = me
        self.view = view
        self.client = None
        self.live = set(alive)

        self.suspects: set[str] = set()

    def alive(self) -> list[tuple[str, str]]:
        return [(n, f"127.0.0.1:{7000 + i}") for i, n in enumerate(sorted(self.live))]

    def suspect(self) -> set[str]:
        return self.suspects & self.live


def partial_snapshot(pieces: dict[int, str] | None = None, *, version: int = 1) -> dict:
    return {
        "snapshot": {"version": version, "partials": {KEY: {"size": SIZE, "piece_size": PIECE, "pieces": pieces or {}}}}
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def swarm_of(
    me: str, wanting: list[str], *, alive: list[str] | None = None, **kw: object
) -> tuple[Swarm, FakeDirectory]:
    """``me``'s swarm for KEY, where every node of ``wanting`` (but ``me``) holds a partial of it."""
    view = HoldingsView()
    for n in wanting:
        if n != me:
            view.update(n, partial_snapshot())
    directory = FakeDirectory(me, [n for n in (alive if alive is not None else wanting) if n != me], view)
    return Swarm(directory, key=KEY, piece_size=PIECE, size=SIZE, **kw), directory  # type: ignore[arg-type]


def readers(swarms: dict[str, Swarm], index: int) -> list[str]:
    return [n for n, s in swarms.items() if s.origin_allowed(index)]


# --- single-flight ------------------------------------------------------------------------------------


def test_each_piece_is_read_from_the_origin_by_exactly_one_wanting_node() -> None:
    swarms = {n: swarm_of(n, NODES)[0] for n in NODES}
    owned = {n: 0 for n in NODES}
    for i in range(PIECES):
        assert readers(swarms, i) == [rank(f"{KEY}:{i}", NODES)[0]], f"piece {i}"
        owned[readers(swarms, i)[0]] += 1
    assert all(count > 0 for count in owned.values()), f"the origin reads are shared out: {owned}"


def test_a_node_that_wants_the_file_alone_reads_every_piece() -> None:
    swarm, _ = swarm_of("n0", ["n0"], alive=["n1", "n2"])  # peers alive, none of them wants this file
    assert all(swarm.origin_allowed(i) for i in range(PIECES))


def test_a_dead_owners_pieces_go_to_the_next_node_in_rank() -> None:
    swarms, dirs = {}, {}
    for n in NODES:
        swarms[n], dirs[n] = swarm_of(n, NODES)
    orphaned = [i for i in range(PIECES) if rank(f"{KEY}:{i}", NODES)[0] == "n0"]
    assert orphaned
    del swarms["n0"]
    for d in dirs.values():
        d.live.discard("n0")  # n0's partial is still in every view; it is just no longer alive
    for i in range(PIECES):
        want = rank(f"{KEY}:{i}", NODES)
        assert readers(swarms, i) == [want[1] if i in orphaned else want[0]], f"piece {i}"


def test_a_stalled_owner_releases_its_pieces_after_stall_timeout() -> None:
    clock = Clock()
    swarm, directory = swarm_of("n1", ["n0", "n1"], stall_timeout_s=10.0, clock=clock)
    theirs = [i for i in range(PIECES) if rank(f"{KEY}:{i}", ["n0", "n1"])[0] == "n0"]
    ours = [i for i in range(PIECES) if i not in theirs]
    assert theirs and ours
    i = theirs[0]

    assert not swarm.origin_allowed(i)
    clock.now += 9.9
    assert not swarm.origin_allowed(i), "n0 has had less than stall_timeout_s"
    # n0 verifies a piece: it is making progress, the clock starts again.
    directory.view.update("n0", {"base": 1, "version": 2, "deltas": [["piece", KEY, 7, DIGEST]]})
    clock.now += 0.2
    assert not swarm.origin_allowed(i)
    clock.now += 9.9
    assert not swarm.origin_allowed(i)
    clock.now += 0.2
    assert all(swarm.origin_allowed(j) for j in theirs), "no progress for stall_timeout_s: n0's pieces are ours to read"
    assert all(swarm.origin_allowed(j) for j in ours)
    directory.view.update("n0", {"base": 2, "version": 3, "deltas": [["piece", KEY, 8, DIGEST]]})
    assert not swarm.origin_allowed(i), "n0 moved again: its pieces are its own again"


def test_the_grace_period_keeps_the_origin_closed_while_peers_are_alive() -> None:
    clock = Clock()
    swarm, _ = swarm_of("n0", ["n0"], alive=["n1"], grace_s=0.5, clock=clock)
    assert not any(swarm.origin_allowed(i) for i in range(PIECES))
    clock.now += 0.49
    assert not any(swarm.origin_allowed(i) for i in range(PIECES))
    clock.now += 0.02
    assert all(swarm.origin_allowed(i) for i in range(PIECES))

    alone, _ = swarm_of("n0", ["n0"], alive=[], grace_s=0.5, clock=Clock())
    assert all(alone.origin_allowed(i) for i in range(PIECES)), "with no live peer there is nobody to wait for"


def test_no_origin_read_while_a_live_peer_holds_the_complete_blob() -> None:
    swarm, directory = swarm_of("n0", ["n0"], alive=["n1"])
    directory.view.update("n1", {"snapshot": {"version": 1, "blobs": {BLOB: SIZE}, "blob_keys": {KEY: BLOB}}})
    swarm.blob_hex = BLOB
    assert not any(swarm.origin_allowed(i) for i in range(PIECES))
    directory.live.discard("n1")
    assert all(swarm.origin_allowed(i) for i in range(PIECES)), "the holder is gone: the origin is open again"


def test_a_refused_holder_does_not_keep_the_origin_closed() -> None:
    """A holder that was banned, or sent this piece wrong, is no reason to wait: the origin opens."""
    swarm, directory = swarm_of("n0", ["n0"], alive=["n1"])
    directory.view.update("n1", {"snapshot": {"version": 1, "blobs": {BLOB: SIZE}, "blob_keys": {KEY: BLOB}}})
    swarm.blob_hex = BLOB
    assert not swarm.origin_allowed(3)
    assert swarm.origin_allowed(3, {"n1"})


def test_a_refused_owner_does_not_own_pieces() -> None:
    swarm, _ = swarm_of("n1", ["n0", "n1"])
    theirs = [i for i in range(PIECES) if rank(f"{KEY}:{i}", ["n0", "n1"])[0] == "n0"]
    assert theirs and not any(swarm.origin_allowed(i) for i in theirs)
    assert all(swarm.origin_allowed(i, {"n0"}) for i in theirs)


def test_peer_sources_list_live_partial_holders_with_their_verified_pieces_only() -> None:
    swarm, directory = swarm_of("n0", ["n0", "n1", "n2", "n3"], alive=["n1", "n2"])
    directory.view.update("n1", partial_snapshot({0: DIGEST, 3: DIGEST, 4: "not-a-digest"}, version=2))
    other_size = {
        "snapshot": {"version": 2, "partials": {KEY: {"size": SIZE, "piece_size": PIECE // 2, "pieces": {0: DIGEST}}}}
    }
    directory.view.update("n2", other_size)
    sources = swarm.peer_sources(set())
    assert [(s.node_id, s.kind, s.pieces) for s in sources] == [("n1", "partials", frozenset({0, 3}))]
    assert sources[0].digests == {0: bytes.fromhex(DIGEST), 3: bytes.fromhex(DIGEST)}
    assert swarm.peer_sources({"n1"}) == [], "a banned peer is no source"


def test_a_suspect_peer_is_a_source_only_for_pieces_no_healthy_peer_holds() -> None:
    # A suspect peer may be a host that vanished: each request to it hangs until the connect
    # timeout, so it is asked only for what nobody healthy can give.
    swarm, directory = swarm_of("n0", ["n0", "n1", "n2"], alive=["n1", "n2"])
    directory.view.update("n1", partial_snapshot({0: DIGEST, 1: DIGEST}, version=2))
    directory.view.update("n2", partial_snapshot({0: DIGEST, 1: DIGEST, 2: DIGEST}, version=2))
    assert [s.node_id for s in swarm.peer_sources(set())] == ["n1", "n2"]
    directory.suspects = {"n2"}
    assert [(s.node_id, s.pieces) for s in swarm.peer_sources(set())] == [
        ("n1", frozenset({0, 1})),
        ("n2", frozenset({2})),
    ], "n2 alone has piece 2: a source for that piece only"
    directory.view.update("n1", partial_snapshot({0: DIGEST, 1: DIGEST, 2: DIGEST}, version=3))
    assert [s.node_id for s in swarm.peer_sources(set())] == ["n1"], "n1 covers it all: n2 is left out"


# --- piece tables ---------------------------------------------------------------------------------------


@pytest.fixture
def sidecar(tmp_path: Path) -> tuple[bytes, str, list[bytes]]:
    """A real ``.pieces`` sidecar, as the store publishes it beside a finished blob."""
    size, piece = 5 * 64 * 1024 + 77, 64 * 1024
    data = os.urandom(size)
    partial = PartialBlob(
        key="x" * 64,
        header=PieceLogHeader(size=size, piece_size=piece, identity_key="http|u|e|1"),
        data_path=tmp_path / "p",
        log_path=tmp_path / "p.pieces",
    )
    partial.open_sync()
    for i in reversed(range(partial.pieces)):  # pieces arrive in any order
        partial.write_piece_sync(i, data[i * piece : (i + 1) * piece])
    table = [partial.done[i] for i in range(partial.pieces)]
    blob_id = partial.finalize_sync(tmp_path / "blob", tmp_path / "blob.pieces")
    return (tmp_path / "blob.pieces").read_bytes(), blob_id.hex, table


def test_a_real_sidecar_gives_the_piece_table(sidecar: tuple[bytes, str, list[bytes]]) -> None:
    raw, blob_hex, table = sidecar
    assert parse_piece_table(raw, blob_hex) == table


def _reencode(raw: bytes, *, size: int = 0, piece_size: int = 0, records: dict[int, bytes] | None = None) -> bytes:
    header, recs = decode_piece_log(raw)
    header = PieceLogHeader(
        size=header.size + size, piece_size=header.piece_size + piece_size, identity_key=header.identity_key
    )
    return encode_piece_log(header, recs if records is None else records)


TAMPERED = {
    "digest-flipped": lambda raw, t: _reencode(raw, records={**dict(enumerate(t)), 2: bytes([t[2][0] ^ 1]) + t[2][1:]}),
    "pieces-swapped": lambda raw, t: _reencode(raw, records={**dict(enumerate(t)), 0: t[1], 1: t[0]}),
    "last-record-dropped": lambda raw, t: raw[:-36],
    "record-missing": lambda raw, t: _reencode(raw, records={i: d for i, d in enumerate(t) if i != 1}),
    "size-changed": lambda raw, t: _reencode(raw, size=1),
    "piece-size-changed": lambda raw, t: _reencode(raw, piece_size=64 * 1024),
    "a-later-record-overrides": lambda raw, t: raw + (0).to_bytes(4, "little") + t[3],
    "not-a-piece-log": lambda raw, t: b"<html>nope</html>",
    "empty": lambda raw, t: b"",
}


@pytest.mark.parametrize("tamper", list(TAMPERED.values()), ids=list(TAMPERED))
def test_a_tampered_sidecar_is_refused(sidecar: tuple[bytes, str, list[bytes]], tamper) -> None:  # noqa: ANN001
    raw, blob_hex, table = sidecar
    assert parse_piece_table(tamper(raw, table), blob_hex) is None


def test_a_sidecar_of_another_blob_is_refused(sidecar: tuple[bytes, str, list[bytes]]) -> None:
    raw, blob_hex, _ = sidecar
    assert parse_piece_table(raw, "0" * 64) is None
