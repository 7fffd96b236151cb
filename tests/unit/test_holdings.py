"""Holdings bookkeeping (cached/peers/holdings.py): versioned deltas and the view of other nodes.

``LocalHoldings.since(v)`` must hand a peer that has version ``v`` exactly the changes after it
(or the whole state once the log no longer reaches back), and a ``HoldingsView`` fed those answers
must end up equal to the source, through the JSON wire form. A delta on the wrong base is refused.
What is announced never names a ``file://`` ref or its manifest (issue 18: file:// is local).
The store's events become the wire's lists in exactly one format (``wire_op``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.peers.holdings import HoldingsView, LocalHoldings, NodeHoldings, wire_op
from cached.types import (
    BlobAdded,
    BlobRemoved,
    ManifestAdded,
    ManifestRemoved,
    PartialDropped,
    PartialStarted,
    PieceVerified,
    RefChanged,
    StoreEvent,
)

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

B1, B2 = "1" * 64, "2" * 64
M1 = "a" * 64
K1 = "k" * 64


def wire(answer: dict[str, Any]) -> dict[str, Any]:
    """What the peer API puts on the wire and the puller parses back."""
    return json.loads(json.dumps(answer))


# --- events ------------------------------------------------------------------------------------------

hexes = st.sampled_from([B1, B2, "3" * 64])
keys = st.sampled_from([K1, "j" * 64])
events = st.one_of(
    st.builds(BlobAdded, blob_hex=hexes, size=st.integers(0, 10**12)),
    st.builds(
        BlobAdded,
        blob_hex=hexes,
        size=st.integers(0, 10**12),
        identity_key=st.sampled_from(["", "http|u|e|1", "file|p|m"]),
    ),
    st.builds(BlobRemoved, blob_hex=hexes),
    st.builds(ManifestAdded, digest=hexes),
    st.builds(ManifestRemoved, digest=hexes),
    st.builds(RefChanged, ref=st.sampled_from(["file:///m", "hf://o/n@main"]), digest=st.none() | hexes),
    st.builds(
        PartialStarted, key=keys, size=st.sampled_from([100, 1 << 20]), piece_size=st.sampled_from([64 << 10, 1 << 20])
    ),
    st.builds(PieceVerified, key=keys, index=st.integers(0, 20), digest=hexes.map(bytes.fromhex)),
    st.builds(PartialDropped, key=keys),
)


def test_each_event_has_its_wire_list() -> None:
    """The format peers exchange (module docstring of cached.peers.holdings) does not change."""
    assert wire_op(BlobAdded(blob_hex=B1, size=10, identity_key="http|u|e|1")) == ["blob+", B1, 10, "http|u|e|1"]
    assert wire_op(BlobAdded(blob_hex=B1, size=10)) == ["blob+", B1, 10, ""]
    assert wire_op(BlobRemoved(blob_hex=B1)) == ["blob-", B1]
    assert wire_op(ManifestAdded(digest=M1)) == ["manifest+", M1]
    assert wire_op(ManifestRemoved(digest=M1)) == ["manifest-", M1]
    assert wire_op(RefChanged(ref="hf://o/n@main", digest=M1)) == ["ref", "hf://o/n@main", M1]
    assert wire_op(RefChanged(ref="hf://o/n@main", digest=None)) == ["ref", "hf://o/n@main", None]
    assert wire_op(PartialStarted(key=K1, size=200, piece_size=64 << 10)) == ["partial+", K1, 200, 64 << 10]
    assert wire_op(PieceVerified(key=K1, index=3, digest=bytes.fromhex(B2))) == ["piece", K1, 3, B2]
    assert wire_op(PartialDropped(key=K1)) == ["partial-", K1]
    with pytest.raises(TypeError):
        wire_op(["blob+", B1, 10])  # type: ignore[arg-type]


def test_record_numbers_every_change() -> None:
    h = LocalHoldings()
    assert h.version == 0
    assert h.record(BlobAdded(blob_hex=B1, size=10)) == 1
    # A manifest is announced with the first shareable ref that names it (the store records the
    # manifest just before the ref): one version each.
    h.record(ManifestAdded(digest=M1))
    assert h.record(RefChanged(ref="hf://o/n@main", digest=M1)) == 3
    assert h.state.blobs == {B1: 10} and h.state.manifests == {M1} and h.state.refs == {"hf://o/n@main": M1}
    assert h.since(1)["deltas"] == [["manifest+", M1], ["ref", "hf://o/n@main", M1]]
    h.record(RefChanged(ref="hf://o/n@main", digest=None))
    assert h.state.refs == {}


def test_a_file_ref_and_its_manifest_are_never_announced() -> None:
    h = LocalHoldings()
    h.record(BlobAdded(blob_hex=B1, size=10))
    for event in (
        ManifestAdded(digest=M1),
        RefChanged(ref="file:///etc/secret", digest=M1),
        RefChanged(ref="FILE:///x", digest=M1),
        RefChanged(ref="file:///etc/secret", digest=None),
        ManifestRemoved(digest=M1),
    ):
        assert h.record(event) == 1, f"{event} stays on this node"
    assert h.state.refs == {} and h.state.manifests == set()
    answers = [h.since(0), h.since(1)]
    assert "file://" not in json.dumps(answers).lower() and M1 not in json.dumps(answers)
    # The same manifest named later by a shareable ref is announced then, once.
    h.record(ManifestAdded(digest=B2))
    h.record(RefChanged(ref="hf://o/n@main", digest=B2))
    assert h.state.manifests == {B2}


def test_since_gives_exactly_the_ops_after_v() -> None:
    h = LocalHoldings()
    all_events: list[StoreEvent] = [
        BlobAdded(blob_hex=B1, size=10),
        PartialStarted(key=K1, size=200, piece_size=64 << 10),
        PieceVerified(key=K1, index=0, digest=bytes.fromhex(B2)),
        BlobRemoved(blob_hex=B1),
        PartialDropped(key=K1),
    ]
    for event in all_events:
        h.record(event)
    all_ops = [
        ["blob+", B1, 10, ""],
        ["partial+", K1, 200, 64 << 10],
        ["piece", K1, 0, B2],
        ["blob-", B1],
        ["partial-", K1],
    ]
    for v in range(1, len(all_ops)):
        assert h.since(v) == {"version": 5, "base": v, "deltas": all_ops[v:]}
    assert h.since(5) == {"version": 5, "base": 5, "deltas": []}, "up to date: nothing to send"


def test_since_zero_or_unknown_version_gives_a_snapshot() -> None:
    h = LocalHoldings()
    h.record(BlobAdded(blob_hex=B1, size=10))
    h.record(BlobAdded(blob_hex=B2, size=20))
    for v in (0, 3, 1000):  # a newcomer; a peer that remembers a later life of ours
        answer = h.since(v)
        assert "deltas" not in answer and answer["version"] == 2
        assert NodeHoldings.from_json(answer["snapshot"]).blobs == {B1: 10, B2: 20}


def test_a_version_older_than_the_log_gives_a_snapshot() -> None:
    h = LocalHoldings(max_log=5)
    for i in range(10):
        h.record(BlobAdded(blob_hex=f"{i:064x}", size=i))
    # The log keeps versions 6..10: a peer at 5 still gets a delta, one at 4 needs everything.
    assert h.since(5) == {"version": 10, "base": 5, "deltas": [["blob+", f"{i:064x}", i, ""] for i in range(5, 10)]}
    for v in (1, 4):
        answer = h.since(v)
        assert "snapshot" in answer and len(answer["snapshot"]["blobs"]) == 10


def test_view_follows_snapshot_then_deltas() -> None:
    src = LocalHoldings()
    src.record(BlobAdded(blob_hex=B1, size=10))
    view = HoldingsView()
    view.update("a", wire(src.since(view.version("a"))))
    assert view.version("a") == 1
    src.record(PartialStarted(key=K1, size=200, piece_size=64 << 10))
    src.record(PieceVerified(key=K1, index=2, digest=bytes.fromhex(B2)))
    answer = wire(src.since(view.version("a")))
    assert "deltas" in answer, "a peer that is one step behind gets a delta, not everything"
    view.update("a", answer)
    got = view.get("a")
    assert got is not None and got.version == 3
    assert got.to_json() == src.state.to_json()


def test_update_with_a_mismatched_base_raises() -> None:
    src = LocalHoldings()
    for event in (
        BlobAdded(blob_hex=B1, size=1),
        BlobAdded(blob_hex=B2, size=2),
        PartialStarted(key=K1, size=10, piece_size=64 << 10),
    ):
        src.record(event)
    view = HoldingsView()
    with pytest.raises(ValueError, match="based on version"):
        view.update("a", src.since(1))  # a delta for a node we have never seen
    view.update("a", {"version": 1, "snapshot": {"version": 1, "blobs": {B1: 1}}})
    with pytest.raises(ValueError, match="based on version 2"):
        view.update("a", src.since(2))  # we are at 1
    got = view.get("a")
    assert got is not None and got.version == 1 and got.blobs == {B1: 1}, "a refused delta changes nothing"
    view.update("a", src.since(1))
    assert view.version("a") == 3


def test_who_has_what() -> None:
    view = HoldingsView()
    a, b = LocalHoldings(), LocalHoldings()
    for event in (
        BlobAdded(blob_hex=B1, size=10),
        PartialStarted(key=K1, size=300, piece_size=64 << 10),
        PieceVerified(key=K1, index=0, digest=bytes.fromhex(B2)),
        RefChanged(ref="hf://o/m@main", digest=M1),
    ):
        a.record(event)
    for event in (
        BlobAdded(blob_hex=B1, size=10),
        BlobAdded(blob_hex=B2, size=20),
        RefChanged(ref="hf://o/m@main", digest=M1),
    ):
        b.record(event)
    view.update("node-b", wire(b.since(0)))
    view.update("node-a", wire(a.since(0)))
    assert view.with_blob(B1) == ["node-a", "node-b"]
    assert view.with_blob(B2) == ["node-b"]
    assert view.with_blob("f" * 64) == []
    [(node, partial)] = view.with_partial(K1)
    assert node == "node-a" and (partial.size, partial.piece_size) == (300, 64 << 10)
    assert partial.pieces == {0: B2}, "piece indexes come back as ints from the JSON wire form"
    assert view.with_ref("hf://o/m@main") == [("node-a", M1), ("node-b", M1)]
    view.forget("node-a")
    assert view.with_blob(B1) == ["node-b"] and view.with_partial(K1) == [] and view.version("node-a") == 0


def test_piece_of_an_unknown_partial_is_ignored_and_a_resized_partial_starts_over() -> None:
    h = NodeHoldings()
    h.apply(["piece", K1, 0, B1])
    assert h.partials == {}
    h.apply(["partial+", K1, 200, 64 << 10])
    h.apply(["piece", K1, 1, B1])
    h.apply(["partial+", K1, 200, 64 << 10])  # re-announced with the same shape: keeps its pieces
    assert h.partials[K1].pieces == {1: B1}
    h.apply(["partial+", K1, 300, 64 << 10])  # another shape: a different download
    assert h.partials[K1].pieces == {}


@pytest.mark.parametrize(
    "op",
    [
        [],
        ["nope", 1],
        ["blob+", B1],
        ["blob+", B1, "x"],
        ["partial+", K1, 10, 0],
        ["partial+", K1, -1, 10],
        ["piece"],
        ["ref", "x"],
    ],
)
def test_malformed_ops_raise(op: list[Any]) -> None:
    with pytest.raises((ValueError, IndexError, TypeError)):
        NodeHoldings().apply(op)


@PROPS
@given(st.lists(events, max_size=40), st.data())
def test_any_since_answer_brings_a_view_at_v_to_the_current_state(
    history: list[StoreEvent], data: st.DataObject
) -> None:
    max_log = data.draw(st.integers(1, 50), label="max_log")
    src = LocalHoldings(max_log=max_log)
    cut = data.draw(st.integers(0, len(history)), label="cut")
    for event in history[:cut]:
        src.record(event)
    v = src.version  # some ops stay local (file:// refs, unnamed manifests): versions count what is announced
    view = HoldingsView()
    if v:
        view.update("n", wire(src.since(0)))
    for event in history[cut:]:
        src.record(event)
    answer = wire(src.since(v))
    if "deltas" in answer:
        assert answer["base"] == v
        assert len(answer["deltas"]) == src.version - v, "exactly the ops after v"
        assert src.version - v <= max_log or v == src.version
    else:
        assert v == 0 or src.version - v > max_log, "a snapshot only when the log does not reach back"
    assert "file://" not in json.dumps(answer), "a file:// ref is never announced"
    if v == 0 and "deltas" in answer:
        return  # nothing recorded at all: a view has nothing to take
    view.update("n", answer)
    got = view.get("n")
    assert got is not None and got.version == src.version
    assert wire(got.to_json()) == wire(src.state.to_json())


@PROPS
@given(st.lists(events, max_size=30))
def test_snapshot_round_trips_through_json(history: list[StoreEvent]) -> None:
    src = LocalHoldings()
    for event in history:
        src.record(event)
    back = NodeHoldings.from_json(wire(src.state.to_json()))
    assert back.to_json() == src.state.to_json()
    assert back.summary() == src.state.summary() == len(src.state.blobs) + len(src.state.partials)
