"""Where a blob's pieces may come from (cached/transfer/sources.py), over a fake peer directory.

Origin single-flight (``transfer.wants``): among the live nodes that want the same origin file, as
the want exchange told each of them, each piece is read from the origin by exactly one, its
rendezvous owner; a dead owner's pieces pass to the next in rank; a live owner keeps its pieces
however long it takes (no clock takes them away); a claimed piece is nobody else's; nobody reads
the origin before joining, nor at all while a live peer holds the complete blob. A finished
blob's piece table is accepted only if it hashes to the blob id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from cached.peers.holdings import HoldingsView
from cached.placement import rank
from cached.store.partial import PartialBlob, PieceLogHeader, decode_piece_log, encode_piece_log
from cached.transfer.sources import Swarm, parse_piece_table
from cached.transfer.wants import WantAnswer, WantMessage, Wants
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

    def __init__(self, me: str, alive: list[str], view: HoldingsView, zones: dict[str, str] | None = None) -> None:
        self.me = me
        self.view = view
        self.client = None
        self.live = set(alive)
        self.zones = zones or {}
        self.suspects: set[str] = set()

    def alive(self) -> list[tuple[str, str]]:
        return [(n, f"127.0.0.1:{7000 + i}") for i, n in enumerate(sorted(self.live))]

    def suspect(self) -> set[str]:
        return self.suspects & self.live

    def zone(self, node_id: str) -> str:
        return self.zones.get(node_id, "")


def partial_snapshot(pieces: dict[int, str] | None = None, *, version: int = 1) -> dict:
    return {
        "snapshot": {"version": version, "partials": {KEY: {"size": SIZE, "piece_size": PIECE, "pieces": pieces or {}}}}
    }


def swarm_of(
    me: str,
    wanting: list[str],
    *,
    alive: list[str] | None = None,
    claimed: dict[str, set[int]] | None = None,
) -> tuple[Swarm, FakeDirectory]:
    """``me``'s swarm for KEY after its want exchange: every node of ``wanting`` (but ``me``)
    answered that it wants the file (with the pieces of ``claimed``) and holds a partial of it."""
    view = HoldingsView()
    for n in wanting:
        if n != me:
            view.update(n, partial_snapshot())
    directory = FakeDirectory(me, [n for n in (alive if alive is not None else wanting) if n != me], view)
    wants = Wants()
    want = wants.register(KEY, SIZE, PIECE, held=[])
    for n in wanting:
        if n != me:
            wants.take_answer(n, WantAnswer(KEY, True, frozenset((claimed or {}).get(n, ()))), wants.clock())
    assert set(want.others) == set(wanting) - {me}
    swarm = Swarm(directory, key=KEY, piece_size=PIECE, size=SIZE, wants=wants)  # type: ignore[arg-type]
    swarm._want = want  # what join() sets once the exchange is done (no sockets here)
    return swarm, directory


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


def test_a_node_that_has_not_joined_reads_nothing() -> None:
    # The others cannot count a node that has not told them it wants the file: it waits for its
    # exchange to end (which takes no timed wait: a node alone ends it at once).
    swarm = Swarm(FakeDirectory("n0", [], HoldingsView()), key=KEY, piece_size=PIECE, size=SIZE, wants=Wants())  # type: ignore[arg-type]
    assert not any(swarm.origin_allowed(i) for i in range(PIECES))


def test_a_dead_owners_pieces_go_to_the_next_node_in_rank() -> None:
    swarms, dirs = {}, {}
    for n in NODES:
        swarms[n], dirs[n] = swarm_of(n, NODES)
    orphaned = [i for i in range(PIECES) if rank(f"{KEY}:{i}", NODES)[0] == "n0"]
    assert orphaned
    del swarms["n0"]
    for d in dirs.values():
        d.live.discard("n0")  # n0's partial is still in every view; it is just no longer alive
    for s in swarms.values():
        s.plan_round()
    for i in range(PIECES):
        want = rank(f"{KEY}:{i}", NODES)
        assert readers(swarms, i) == [want[1] if i in orphaned else want[0]], f"piece {i}"


def test_a_live_owner_keeps_its_pieces_however_slow_it_is() -> None:
    # The 16-node slow-origin run read the file 2.7x: a stall clock shorter than one piece at a
    # few Mbit/s took every owner's pieces away. Only death (membership) or an exact "I gave up"
    # hands them over now; a slow owner is asked again (recheck), never guessed about.
    swarm, directory = swarm_of("n1", ["n0", "n1"])
    theirs = [i for i in range(PIECES) if rank(f"{KEY}:{i}", ["n0", "n1"])[0] == "n0"]
    assert theirs and not any(swarm.origin_allowed(i) for i in theirs)
    directory.suspects = {"n0"}  # even a suspect heartbeat: it may still be reading
    swarm.plan_round()
    assert not any(swarm.origin_allowed(i) for i in theirs)
    directory.live.discard("n0")
    swarm.plan_round()
    assert all(swarm.origin_allowed(i) for i in theirs), "dead: its pieces are the next owner's"


def test_a_piece_another_wanter_claimed_is_not_read_again() -> None:
    ours = [i for i in range(PIECES) if rank(f"{KEY}:{i}", ["n0", "n1"])[0] == "n1"]
    swarm, _ = swarm_of("n1", ["n0", "n1"], claimed={"n0": {ours[0]}})
    assert not swarm.origin_allowed(ours[0]), "n0 already holds or is reading it"
    assert all(swarm.origin_allowed(i) for i in ours[1:])
    assert swarm.origin_allowed(ours[0], {"n0"}), "unless n0 sent that piece wrong"


def test_no_origin_read_while_a_live_peer_holds_the_complete_blob() -> None:
    swarm, directory = swarm_of("n0", ["n0"], alive=["n1"])
    directory.view.update("n1", {"snapshot": {"version": 1, "blobs": {BLOB: SIZE}, "blob_keys": {KEY: BLOB}}})
    swarm.blob_hex = BLOB
    assert not any(swarm.origin_allowed(i) for i in range(PIECES))
    directory.live.discard("n1")
    swarm.plan_round()
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


def test_the_origin_window_lets_a_few_pieces_in_at_a_time_while_several_want_the_file() -> None:
    swarm, _ = swarm_of("n0", ["n0", "n1"])
    swarm.plan_round(missing=range(PIECES))
    mine = [i for i in range(PIECES) if rank(f"{KEY}:{i}", ["n0", "n1"])[0] == "n0"]
    allowed = [i for i in mine if swarm.origin_allowed(i)]
    assert allowed and all(i < 4 for i in allowed), allowed  # ORIGIN_WINDOW pieces, cluster-wide
    alone, _ = swarm_of("n0", ["n0"])
    alone.plan_round(missing=range(PIECES))
    assert all(alone.origin_allowed(i) for i in range(PIECES)), "alone: no window"


def test_each_zone_has_its_own_origin_window() -> None:
    # A piece read across a busy zone link is slow; with one window for the cluster it held the
    # other zone's origin reads back (the origin idled in bursts).
    zones = {"n0": "a", "n1": "a", "n2": "b", "n3": "b"}
    swarm, directory = swarm_of("n0", NODES)
    directory.zones = zones
    swarm.plan_round(missing=range(PIECES))
    owner = {i: rank(f"{KEY}:{i}", NODES)[0] for i in range(PIECES)}
    zone_a = [i for i in range(PIECES) if zones[owner[i]] == "a"]
    allowed = {i for i in range(PIECES) if swarm.origin_allowed(i)}
    assert allowed == {i for i in zone_a[:4] if owner[i] == "n0"}, allowed
    assert max(allowed) >= 4, "a piece past the first four: zone b's unfinished pieces do not hold it back"


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


def test_a_piece_held_only_in_another_zone_is_pulled_across_by_one_node_of_the_zone() -> None:
    zones = {"n0": "a", "n1": "a", "n2": "b"}
    pulls = {}
    for me in ("n0", "n1"):
        swarm, directory = swarm_of(me, ["n0", "n1", "n2"])
        directory.zones = zones
        directory.view.update("n2", partial_snapshot({i: DIGEST for i in range(8)}, version=2))
        (src,) = [p for p in swarm.peer_sources(set()) if p.node_id == "n2"]
        assert src.cross_zone
        pulls[me] = src.pieces
    assert pulls["n0"] | pulls["n1"] == frozenset(range(8)) and not pulls["n0"] & pulls["n1"], pulls


# --- hand-over across zones --------------------------------------------------------------------------


class Exchange:
    """``PeerClient.want`` between in-process registries: each node's ``Wants`` answers the
    message it is sent, as the peer API does."""

    def __init__(self, directory: FakeDirectory, registries: dict[str, Wants]) -> None:
        self.directory = directory
        self.registries = registries
        self.lose_answers = False  # the owner handles the message; its answer never arrives

    async def want(self, address: str, body: dict) -> dict:
        node = {a: n for n, a in self.directory.alive()}[address]
        msg = WantMessage.from_json({**body, "key": "0" * 64})  # checked as the peer API does (KEY is not hex)
        answer = self.registries[node].receive(self.directory.me, dataclasses.replace(msg, key=body["key"]))
        if self.lose_answers:
            raise ConnectionResetError("the answer was lost")
        return answer.to_json()


ZONES = {"n0": "a", "n1": "a", "n2": "b", "n3": "b"}


def zoned_swarms() -> dict[str, tuple[Swarm, FakeDirectory]]:
    out = {}
    for n in NODES:
        swarm, directory = swarm_of(n, NODES)
        directory.zones = ZONES
        out[n] = (swarm, directory)
    registries = {n: s._wants for n, (s, _) in out.items()}
    for swarm, directory in out.values():
        directory.client = Exchange(directory, registries)  # type: ignore[assignment]
        swarm._want.owns = swarm._owns  # type: ignore[union-attr] - what join() sets
    return out


def owners() -> dict[int, str]:
    return {i: rank(f"{KEY}:{i}", NODES)[0] for i in range(PIECES)}


def test_no_hand_over_while_the_zone_has_pieces_of_its_own_to_start_nor_without_zones() -> None:
    swarm, _ = zoned_swarms()["n0"]
    swarm.plan_round(missing=range(PIECES))
    assert swarm.steal_candidate() is None, "zone a's own share is not started yet"
    plain, _ = swarm_of("n0", NODES)
    zone_a = [i for i, o in owners().items() if ZONES[o] == "a"]
    plain._want.claimed.update(zone_a)  # type: ignore[union-attr]
    plain.plan_round(missing=range(PIECES))
    assert plain.steal_candidate() is None, "one zone: the origin window does the sharing"


async def test_a_zone_done_with_its_share_takes_the_other_zones_last_piece_and_its_owner_never_reads_it() -> None:
    swarms = zoned_swarms()
    own = owners()
    zone_a = {i for i, o in own.items() if ZONES[o] == "a"}
    n0, _ = swarms["n0"]
    n0._want.claimed.update(zone_a)  # type: ignore[union-attr] - every piece of zone a started
    n0.plan_round(missing=range(PIECES))
    candidate = n0.steal_candidate()
    assert candidate is not None
    index, owner = candidate
    assert index == max(i for i in range(PIECES) if ZONES[own[i]] == "b"), "the last piece of zone b's share"
    assert owner == own[index]
    assert await n0.steal(index, owner)
    n0.plan_round(missing=range(PIECES))
    assert n0.origin_allowed(index), "handed over: n0 reads it"
    theirs, _ = swarms[owner]
    theirs.plan_round(missing=range(PIECES))
    assert not theirs.origin_allowed(index), "the owner no longer does"
    # A second asker is refused: the piece is n0's now.
    n1, _ = swarms["n1"]
    n1._want.claimed.update(zone_a)  # type: ignore[union-attr]
    assert not await n1.steal(index, owner)
    n1.plan_round(missing=range(PIECES))
    assert not n1.origin_allowed(index)
    assert n1.steal_candidate() != (index, owner), "a refused piece is not asked for again"


async def test_an_owner_that_started_the_piece_refuses_to_hand_it_over() -> None:
    swarms = zoned_swarms()
    own = owners()
    index = max(i for i in range(PIECES) if ZONES[own[i]] == "b")
    theirs, _ = swarms[own[index]]
    theirs.claim(index)  # the owner started it before the question arrived
    n0, _ = swarms["n0"]
    n0.plan_round(missing=range(PIECES))
    assert not await n0.steal(index, own[index])
    n0.plan_round(missing=range(PIECES))
    assert not n0.origin_allowed(index)


async def test_an_asker_whose_answer_was_lost_asks_again_and_gets_the_same_grant() -> None:
    # The owner granted, the answer never arrived: the piece is the asker's at the owner, so the
    # asker must not give up on it (nobody else would read it: the fetch would stall).
    swarms = zoned_swarms()
    own = owners()
    n0, d0 = swarms["n0"]
    n0._want.claimed.update(i for i, o in own.items() if ZONES[o] == "a")  # type: ignore[union-attr]
    n0.plan_round(missing=range(PIECES))
    index, owner = n0.steal_candidate()  # type: ignore[misc]
    d0.client.lose_answers = True  # type: ignore[attr-defined]
    assert not await n0.steal(index, owner)
    n0.plan_round(missing=range(PIECES))
    assert n0.steal_candidate() == (index, owner), "asked again"
    d0.client.lose_answers = False  # type: ignore[attr-defined]
    assert await n0.steal(index, owner)
    n0.plan_round(missing=range(PIECES))
    assert n0.origin_allowed(index)


async def test_only_the_owner_hands_a_piece_over_and_the_grant_reaches_the_other_wanters() -> None:
    swarms = zoned_swarms()
    own = owners()
    n0, _ = swarms["n0"]
    index = max(i for i in range(PIECES) if ZONES[own[i]] == "b")
    other = next(n for n in ("n2", "n3") if n != own[index])
    assert not await n0.steal(index, other), "not its owner: it cannot know who else may read it"
    assert await n0.steal(index, own[index])
    await asyncio.gather(*n0._telling)
    for n in NODES:
        if n not in ("n0", own[index]):
            theirs, _ = swarms[n]
            assert index in theirs._want.others["n0"].claimed, f"{n} learned n0 reads it"  # type: ignore[union-attr]
            theirs.plan_round(missing=range(PIECES))
            assert not theirs.origin_allowed(index)


def test_a_hand_over_is_granted_once_and_never_for_a_piece_someone_holds() -> None:
    owner = Wants()
    owner.register(KEY, SIZE, PIECE, held=[0])
    ask = lambda who, i: owner.receive(who, WantMessage(KEY, True, SIZE, PIECE, frozenset(), steal=i))  # noqa: E731
    assert ask("x", 0).granted is False, "the owner holds it"
    owner.receive("y", WantMessage(KEY, True, SIZE, PIECE, frozenset()))
    owner.receive("y", WantMessage(KEY, True, SIZE, PIECE, frozenset(), {2: b"\x01" * 32}))
    assert ask("x", 2).granted is False, "another wanter told us it verified it"
    assert ask("x", 5).granted is True
    assert ask("z", 5).granted is False, "already handed to x"
    assert 5 in owner.get(KEY).others["x"].claimed  # type: ignore[union-attr]
    assert owner.receive("y", WantMessage(KEY, True, SIZE, PIECE, frozenset())).granted is None, "nothing asked"
    stranger = Wants()
    assert stranger.receive("x", WantMessage(KEY, True, SIZE, PIECE, frozenset(), steal=5)).granted is False


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
