"""Membership merge rules (cached/peers/membership.py), driven by an injected clock.

A member's entry is replaced only by a strictly newer (incarnation, heartbeat); its status comes
from how long ago that pair last advanced here (alive -> suspect -> dead -> forgotten); a higher
incarnation brings a dead node back; other clusters never get in; and a node that hears of a
later life of its own id jumps past it.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.peers.membership import MemberInfo, Membership, Status

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SUSPECT, DEAD, FORGET = 5.0, 15.0, 60.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def info(node_id: str, incarnation: int = 1, heartbeat: int = 0, *, cluster: str = "c1", **kw: object) -> MemberInfo:
    return MemberInfo(
        node_id=node_id,
        address=f"127.0.0.1:{7000 + len(node_id)}",
        cluster=cluster,
        incarnation=incarnation,
        heartbeat=heartbeat,
        **kw,
    )  # type: ignore[arg-type]


def membership(clock: Clock, node_id: str = "me", cluster: str = "c1", incarnation: int = 10) -> Membership:
    return Membership(
        info(node_id, incarnation, cluster=cluster),
        suspect_after_s=SUSPECT,
        dead_after_s=DEAD,
        forget_after_s=FORGET,
        clock=clock,
    )


# --- merging -----------------------------------------------------------------------------------


def test_a_new_member_is_added_alive_and_reported_changed() -> None:
    m = membership(Clock())
    assert m.merge([info("a", 1, 3)]) == ["a"]
    got = m.get("a")
    assert got is not None and got.status is Status.ALIVE and got.info.age == (1, 3)
    assert m.counts() == {"alive": 1, "suspect": 0, "dead": 0}


@pytest.mark.parametrize(
    ("have", "incoming", "wins"),
    [
        ((1, 5), (1, 6), True),  # later heartbeat, same life
        ((1, 5), (2, 0), True),  # a new life beats any heartbeat of the old one
        ((1, 5), (1, 5), False),  # same age: nothing new
        ((1, 5), (1, 4), False),  # stale heartbeat
        ((2, 0), (1, 999), False),  # an old life, however many beats it had
    ],
)
def test_only_a_strictly_newer_incarnation_heartbeat_replaces_an_entry(
    have: tuple[int, int], incoming: tuple[int, int], wins: bool
) -> None:
    m = membership(Clock())
    m.merge([info("a", *have, holdings_version=1)])
    changed = m.merge([info("a", *incoming, holdings_version=2)])
    got = m.get("a")
    assert got is not None
    assert (changed == ["a"]) is wins
    assert got.info.age == (incoming if wins else have)
    assert got.info.holdings_version == (2 if wins else 1), "facts travel with the entry that won"


def test_a_stale_entry_does_not_count_as_progress() -> None:
    clock = Clock()
    m = membership(clock)
    m.merge([info("a", 1, 5)])
    clock.now += SUSPECT - 1
    m.merge([info("a", 1, 5), info("a", 1, 4)])  # repeats and stale copies keep arriving
    clock.now += 2
    assert m.refresh() == [("a", Status.SUSPECT)]


def test_members_of_another_cluster_are_ignored() -> None:
    m = membership(Clock(), cluster="c1")
    assert m.merge([info("x", cluster="c2"), info("y", 3, 3, cluster="")]) == []
    assert m.members() == [] and m.get("x") is None
    # Not even a later life of an id we know crosses clusters.
    m.merge([info("a", 1, 1)])
    assert m.merge([info("a", 9, 9, cluster="c2")]) == []
    got = m.get("a")
    assert got is not None and got.info.age == (1, 1) and got.info.cluster == "c1"


def test_our_own_id_is_never_a_member() -> None:
    m = membership(Clock(), incarnation=10)
    assert m.merge([info("me", 10, 50), info("me", 3, 0)]) == []
    assert m.get("me") is None and m.members() == []
    assert m.me.incarnation == 10, "an older or equal life of ours changes nothing"


def test_our_own_id_with_a_higher_incarnation_makes_us_jump_past_it() -> None:
    clock = Clock()
    m = membership(clock, incarnation=10)
    m.beat()
    m.beat()
    assert m.me.age == (10, 2)
    m.merge([info("me", 25, 7)])
    assert m.me.incarnation == 26 and m.me.heartbeat == 0
    # ... so our own entries beat the ghost's everywhere: a peer holding the ghost takes ours.
    peer = membership(clock, node_id="peer")
    peer.merge([info("me", 25, 7)])
    assert peer.merge([m.beat()]) == ["me"]
    got = peer.get("me")
    assert got is not None and got.info.incarnation == 26


def test_beat_advances_heartbeat_and_publishes_facts() -> None:
    m = membership(Clock(), incarnation=4)
    first = m.beat(holdings_version=7, capacity_bytes=100)
    assert first.age == (4, 1) and first.holdings_version == 7 and first.capacity_bytes == 100
    second = m.beat()
    assert second.age == (4, 2) and second.holdings_version == 7 and second.capacity_bytes == 100, (
        "unset facts are kept"
    )
    assert m.snapshot()[0] == second


# --- status by the clock -------------------------------------------------------------------------


def test_alive_then_suspect_then_dead_then_forgotten_by_the_clock() -> None:
    clock = Clock()
    m = membership(clock)
    m.merge([info("a", 1, 1)])
    seen: list[tuple[float, list[tuple[str, Status]]]] = []
    for offset in (0.0, SUSPECT - 0.01, SUSPECT, DEAD - 0.01, DEAD, DEAD + FORGET - 0.01):
        clock.now = 1000.0 + offset
        seen.append((offset, m.refresh()))
    assert [moves for _, moves in seen] == [[], [], [("a", Status.SUSPECT)], [], [("a", Status.DEAD)], []]
    assert m.counts() == {"alive": 0, "suspect": 0, "dead": 1}
    assert m.alive() == []
    clock.now = 1000.0 + DEAD + FORGET
    assert m.refresh() == []
    assert m.get("a") is None and m.members() == [], "forgotten after forget_after_s of being dead"


def test_heartbeat_progress_keeps_a_member_alive_and_heals_a_suspect() -> None:
    clock = Clock()
    m = membership(clock)
    for hb in range(10):
        m.merge([info("a", 1, hb)])
        clock.now += SUSPECT * 0.9
        assert m.refresh() == []
    clock.now += SUSPECT
    assert m.refresh() == [("a", Status.SUSPECT)]
    assert m.merge([info("a", 1, 10)]) == ["a"]
    got = m.get("a")
    assert got is not None and got.status is Status.ALIVE


def test_a_higher_incarnation_revives_a_dead_member() -> None:
    clock = Clock()
    m = membership(clock)
    m.merge([info("a", 1, 100)])
    clock.now += DEAD
    assert m.refresh() == [("a", Status.DEAD)]
    # Gossip still carrying its last life does not bring it back.
    assert m.merge([info("a", 1, 100)]) == []
    got = m.get("a")
    assert got is not None and got.status is Status.DEAD
    # The restarted node (a new incarnation, heartbeat starting over) does.
    assert m.merge([info("a", 2, 0, holdings_version=0)]) == ["a"]
    got = m.get("a")
    assert got is not None and got.status is Status.ALIVE and got.info.age == (2, 0)
    assert m.refresh() == [], "its clock restarted with the new life"
    clock.now += SUSPECT - 0.01
    assert m.refresh() == []
    assert [x.info.node_id for x in m.alive()] == ["a"]


def test_counts_and_queries() -> None:
    clock = Clock()
    m = membership(clock)
    m.merge([info("b", 1, 1), info("a", 1, 1)])
    clock.now += SUSPECT
    m.merge([info("c", 1, 1)])
    m.refresh()
    assert [x.info.node_id for x in m.members()] == ["a", "b", "c"], "sorted by id"
    assert [x.info.node_id for x in m.alive()] == ["c"]
    assert m.counts() == {"alive": 1, "suspect": 2, "dead": 0}
    assert [i.node_id for i in m.snapshot()] == ["me", "a", "b", "c"], "ourselves first, then everyone we know"


# --- wire form -------------------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=30)
counters = st.integers(min_value=0, max_value=2**63 - 1)  # the wire bound: n < 2**63
infos = st.builds(
    MemberInfo,
    node_id=names,
    address=st.builds(lambda h, p: f"{h}:{p}", names, st.integers(1, 65535)),
    cluster=names,
    incarnation=counters,
    heartbeat=counters,
    holdings_version=counters,
    capacity_bytes=counters,
    labels=st.dictionaries(names, names, max_size=3),
)


@PROPS
@given(infos)
def test_member_info_round_trips_through_json(i: MemberInfo) -> None:
    assert MemberInfo.from_json(json.loads(json.dumps(i.to_json()))) == i


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"node_id": "a", "address": "h:1", "cluster": "c"},  # no incarnation
        {"node_id": "a", "address": "h:1", "cluster": "c", "incarnation": "x"},
        {"node_id": "a", "address": "h:1", "cluster": "c", "incarnation": [1]},
        {"node_id": "a", "address": "h:1", "cluster": "c", "incarnation": -1},
        {"node_id": "a", "address": "h:1", "cluster": "c", "incarnation": 1, "heartbeat": -5},
        {"node_id": "", "address": "h:1", "cluster": "c", "incarnation": 1},
        {"node_id": "a" * 254, "address": "h:1", "cluster": "c", "incarnation": 1},
        {"node_id": "a", "address": "", "cluster": "c", "incarnation": 1},
        {"node_id": "a", "address": "h" * 301, "cluster": "c", "incarnation": 1},
        {"node_id": "a", "address": "h:1", "cluster": "c", "incarnation": 1, "labels": [1, 2]},
        {"node_id": "a", "address": "h:1", "cluster": "c", "incarnation": 1, "labels": "x"},
    ],
)
def test_malformed_member_entries_raise_value_error(raw: dict) -> None:
    with pytest.raises(ValueError):
        MemberInfo.from_json(raw)


# --- properties ------------------------------------------------------------------------------------

ages = st.tuples(st.integers(0, 5), st.integers(0, 20))
gossip_lists = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "me"]), ages, st.sampled_from(["c1", "c1", "c2"])), max_size=40
)


@PROPS
@given(gossip_lists, st.randoms(use_true_random=False))
def test_merge_keeps_the_newest_age_per_member_whatever_the_order(entries: list, rnd: random.Random) -> None:
    """Gossip is delivered in any order, in any batches: the outcome is the max age per node."""
    expected: dict[str, tuple[int, int]] = {}
    for node_id, age, cluster in entries:
        if cluster == "c1" and node_id != "me":
            expected[node_id] = max(expected.get(node_id, (-1, -1)), age)
    for _ in range(3):
        shuffled = list(entries)
        rnd.shuffle(shuffled)
        m = membership(Clock(), incarnation=3)
        i = 0
        while i < len(shuffled):
            n = rnd.randint(1, 5)
            m.merge([info(nid, *age, cluster=cl) for nid, age, cl in shuffled[i : i + n]])
            i += n
        assert {x.info.node_id: x.info.age for x in m.members()} == expected
        own = [age[0] for nid, age, cl in entries if nid == "me" and cl == "c1" and age[0] > 3]
        if own:
            # We jump past each later life we hear of as it arrives; one arriving after the jump
            # equal to our new incarnation is not "higher" and leaves us tied with it.
            assert max(own) <= m.me.incarnation <= max(own) + 1
        else:
            assert m.me.incarnation == 3


@PROPS
@given(st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.booleans()), max_size=30))
def test_status_always_matches_the_time_since_last_progress(steps: list[tuple[float, bool]]) -> None:
    clock = Clock(0.0)
    m = membership(clock)
    hb = 0
    m.merge([info("a", 1, hb)])
    last = 0.0
    for dt, beats in steps:
        clock.now += dt
        if beats:
            hb += 1
            m.merge([info("a", 1, hb)])
            last = clock.now
        m.refresh()
        age = clock.now - last
        got = m.get("a")
        if age >= DEAD + FORGET:
            assert got is None
            return
        assert got is not None
        want = Status.ALIVE if age < SUSPECT else Status.SUSPECT if age < DEAD else Status.DEAD
        assert got.status is want, (age, got.status)
