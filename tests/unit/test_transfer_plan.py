"""Transfer planning: which missing piece to ask of which source.

Properties check every plan against the rules in cached/transfer/plan.py and DESIGN.md: only
holders are asked, limits hold, the origin only serves pieces no peer holds, rarest pieces first,
no free slot left idle, and in endgame one second source per piece.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cached.transfer.plan import ORIGIN, Assignment, SourceView, assign

# See test_types.py: the loop guard fails a plain test that runs past 1 s.
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

N = 16  # pieces per blob in generated cases


def peer(name: str, limit: int = 4, inflight: int = 0, pieces: set[int] | None = None) -> SourceView:
    return SourceView(
        name=name, is_origin=False, limit=limit, inflight=inflight, pieces=None if pieces is None else frozenset(pieces)
    )


def origin(limit: int = 4, inflight: int = 0) -> SourceView:
    return SourceView(name=ORIGIN, is_origin=True, limit=limit, inflight=inflight)


def bits(mask: int) -> set[int]:
    return {i for i in range(N) if mask >> i & 1}


@st.composite
def situations(draw: st.DrawFn) -> dict:
    full = (1 << N) - 1
    peer_rows = draw(
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.none() | st.integers(0, full)), max_size=4)
    )
    sources = [
        peer(f"p{i}", limit, inflight, None if mask is None else bits(mask))
        for i, (limit, inflight, mask) in enumerate(peer_rows)
    ]
    if draw(st.booleans()):
        sources.append(origin(draw(st.integers(0, 5)), draw(st.integers(0, 5))))
    names = [s.name for s in sources] or [ORIGIN]
    missing = sorted(bits(draw(st.integers(0, full))))
    # Endgame needs every missing piece in flight; random choice alone would almost never get there.
    if draw(st.booleans()):
        missing = missing[:4]
        in_flight_pieces = missing
    else:
        in_flight_pieces = [i for i in missing if draw(st.integers(0, 3)) == 0] if missing else []
    inflight: dict[int, set[str]] = {}
    for i in in_flight_pieces:
        mask = draw(st.integers(1, (1 << len(names)) - 1))
        inflight[i] = {n for j, n in enumerate(names) if mask >> j & 1}
    return dict(
        missing=missing,
        inflight=inflight,
        sources=sources,
        global_free=draw(st.integers(-1, 10)),
        endgame_pieces=draw(st.integers(0, 4)),
    )


def rarity(index: int, sources: list[SourceView]) -> int:
    return sum(1 for s in sources if not s.is_origin and s.holds(index))


def eligible(index: int, sources: list[SourceView]) -> list[SourceView]:
    """Who may serve a piece nobody is fetching yet: peers holding it, else the origin."""
    holders = [s for s in sources if not s.is_origin and s.holds(index)]
    return holders or [s for s in sources if s.is_origin]


@PROPS
@given(situations())
def test_every_request_goes_to_a_holder_within_every_limit(case: dict) -> None:
    out = assign(**case)
    by_name = {s.name: s for s in case["sources"]}
    for a in out:
        assert isinstance(a, Assignment)
        assert a.source in by_name, a
        assert by_name[a.source].holds(a.piece), a
    per_source = Counter(a.source for a in out)
    for name, n in per_source.items():
        assert n <= by_name[name].free, (name, n)
    assert len(out) <= max(0, case["global_free"])


@PROPS
@given(situations())
def test_fresh_pieces_are_asked_once_and_of_the_origin_only_when_no_peer_holds_them(case: dict) -> None:
    out = assign(**case)
    fresh = [a for a in out if a.piece not in case["inflight"]]
    assert all(a.piece in case["missing"] for a in fresh)
    assert len({a.piece for a in fresh}) == len(fresh)
    by_name = {s.name: s for s in case["sources"]}
    for a in fresh:
        if by_name[a.source].is_origin:
            assert rarity(a.piece, case["sources"]) == 0, a


@PROPS
@given(situations())
def test_endgame_duplicates_only_in_endgame_and_only_to_a_new_source(case: dict) -> None:
    out = assign(**case)
    dup = [a for a in out if a.piece in case["inflight"]]
    if not dup:
        return
    todo = [i for i in case["missing"] if i not in case["inflight"]]
    assert not todo
    assert 0 < len(case["inflight"]) <= case["endgame_pieces"]
    assert len({a.piece for a in dup}) == len(dup)
    for a in dup:
        assert a.source not in case["inflight"][a.piece], a


@PROPS
@given(situations())
def test_no_free_slot_is_left_idle_and_rarer_pieces_go_first(case: dict) -> None:
    out = assign(**case)
    sources, inflight = case["sources"], case["inflight"]
    remaining = {s.name: s.free for s in sources}
    for a in out:
        remaining[a.source] -= 1
    budget_left = max(0, case["global_free"]) - len(out)
    assigned = {a.piece for a in out}
    todo = [i for i in case["missing"] if i not in inflight]
    fresh_rarities = [rarity(a.piece, sources) for a in out if a.piece not in inflight]
    for index in todo:
        if index in assigned:
            continue
        if any(remaining[s.name] > 0 for s in eligible(index, sources) if s.holds(index)):
            # It could still be served: only the global limit stopped it, and only after pieces
            # at least as rare as it took the budget.
            assert budget_left == 0, index
            assert all(r <= rarity(index, sources) for r in fresh_rarities), index
    if todo or not 0 < len(inflight) <= case["endgame_pieces"]:
        return
    for index, asked in inflight.items():
        # Endgame: a piece with one source gets a second one if any holder has a free slot.
        if len(asked) == 1 and index not in assigned:
            idle = [s for s in sources if s.name not in asked and s.holds(index) and remaining[s.name] > 0]
            assert budget_left == 0 or not idle, (index, idle)


@PROPS
@given(situations())
@example(
    {
        "missing": [7],
        "inflight": {7: {"p0", "p1"}},
        "sources": [peer("p0"), peer("p1"), peer("p2")],
        "global_free": 8,
        "endgame_pieces": 4,
    }
)
def test_endgame_keeps_at_most_two_sources_per_piece(case: dict) -> None:
    # DESIGN.md: "the last pieces are requested from two sources and the slower copy is cancelled".
    # The scheduler calls assign after every finished request with the duplicate recorded in
    # inflight, so a third, fourth ... source must not be added on later calls.
    out = assign(**case)
    for a in out:
        if a.piece in case["inflight"]:
            assert len(case["inflight"][a.piece]) + 1 <= 2, a


# --- worked examples -----------------------------------------------------------------------------


def test_rarest_piece_is_asked_first() -> None:
    sources = [peer("a", pieces={0, 1, 2}), peer("b", pieces={0, 1}), peer("c", pieces={0})]
    assert [a.piece for a in assign(missing=[0, 1, 2], inflight={}, sources=sources, global_free=1)] == [2]
    assert [a.piece for a in assign(missing=[0, 1, 2], inflight={}, sources=sources, global_free=2)] == [2, 1]


def test_least_loaded_peer_is_chosen() -> None:
    busy, idle = peer("busy", limit=4, inflight=3), peer("idle", limit=4, inflight=0)
    assert assign(missing=[0], inflight={}, sources=[busy, idle], global_free=8) == [Assignment(0, "idle")]
    # Load is relative to each peer's limit: 2 of 8 is less loaded than 1 of 2.
    wide, narrow = peer("wide", limit=8, inflight=2), peer("narrow", limit=2, inflight=1)
    assert assign(missing=[0], inflight={}, sources=[narrow, wide], global_free=8) == [Assignment(0, "wide")]


@PROPS
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_equal_idle_peers_share_the_work_evenly(k: int, limit: int, data: st.DataObject) -> None:
    pieces = data.draw(st.integers(1, k * limit))
    sources = [peer(f"p{i}", limit=limit) for i in range(k)]
    out = assign(missing=list(range(pieces)), inflight={}, sources=sources, global_free=100)
    assert len(out) == pieces
    counts = Counter(a.source for a in out)
    assert max(counts.values()) - min(counts.get(s.name, 0) for s in sources) <= 1


def test_origin_waits_for_a_busy_peer_that_holds_the_piece() -> None:
    sources = [peer("a", limit=1, inflight=1, pieces={0}), origin(limit=4)]
    assert assign(missing=[0, 1], inflight={}, sources=sources, global_free=8) == [Assignment(1, ORIGIN)]


def test_endgame_asks_a_second_source_only_for_the_last_pieces() -> None:
    sources = [peer("a", pieces={0, 1, 2}), origin()]
    inflight = {0: {ORIGIN}, 1: {ORIGIN}}
    out = assign(missing=[0, 1], inflight=inflight, sources=sources, global_free=8, endgame_pieces=2)
    assert sorted(out, key=lambda a: a.piece) == [Assignment(0, "a"), Assignment(1, "a")]
    # More in flight than the endgame threshold, or pieces still unrequested: no duplicates.
    assert assign(missing=[0, 1], inflight=inflight, sources=sources, global_free=8, endgame_pieces=1) == []
    assert assign(missing=[0, 1, 2], inflight=inflight, sources=sources, global_free=8, endgame_pieces=4) == [
        Assignment(2, "a")
    ]


def test_nothing_is_asked_without_budget_or_slots() -> None:
    sources = [peer("a"), origin()]
    assert assign(missing=[0, 1], inflight={}, sources=sources, global_free=0) == []
    assert assign(missing=[0, 1], inflight={}, sources=sources, global_free=-3) == []
    full = [peer("a", limit=2, inflight=2), origin(limit=0)]
    assert assign(missing=[0, 1], inflight={}, sources=full, global_free=8) == []
