"""Zone- and rack-aware placement (``cached.placement.place``, used by ``cluster.owners_of``).

Copies of a key spread across ``labels.zone`` first and ``labels.rack`` second; unlabelled
members place exactly as plain HRW did; when an owner leaves, the other owners keep their role
and the heir is a member of the leaver's zone (the spread holds); a member that owned nothing
leaving moves nothing when every zone has a copy; shares still follow capacity. The hash is
deterministic, so the figures are fixed: the tolerances only say what they mean.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from cached.api.k8s import score
from cached.cluster import CatalogEntry, Holding, Member, owners_of
from cached.placement import owners, place, rank
from cached.types import JobState

KEYS = [f"http://origin.test/models/m-{i}.gguf" for i in range(1500)]


def two_zones(per_zone: int = 4, racks: int = 1) -> dict[str, dict[str, str]]:
    """``a0..`` in zone a, ``b0..`` in zone b; with ``racks`` > 1, members dealt over racks r0..."""
    out: dict[str, dict[str, str]] = {}
    for zone in "ab":
        for i in range(per_zone):
            labels = {"zone": zone}
            if racks > 1:
                labels["rack"] = f"r{i % racks}"
            out[f"{zone}{i}"] = labels
    return out


def zone_of(members: dict[str, dict[str, str]], node: str) -> str:
    return members[node].get("zone", "")


@settings(max_examples=80, deadline=None)
@given(
    key=st.text(min_size=1, max_size=30),
    members=st.lists(
        st.text(alphabet="abcdef-0123456789", min_size=1, max_size=8), min_size=1, max_size=10, unique=True
    ),
    replicas=st.integers(min_value=0, max_value=12),
)
def test_without_zone_labels_placement_is_plain_hrw(key: str, members: list[str], replicas: int) -> None:
    weights = {m: 1.0 + (len(m) % 3) for m in members}
    unlabelled = {m: {"gpu": "h100"} for m in members}
    assert place(key, unlabelled, replicas, weights) == owners(key, members, replicas, weights)


@settings(max_examples=80, deadline=None)
@given(
    key=st.text(min_size=1, max_size=30),
    labelled=st.dictionaries(
        st.text(alphabet="abcdef0123456789", min_size=1, max_size=6),
        st.tuples(st.sampled_from(["", "z1", "z2", "z3"]), st.sampled_from(["", "r1", "r2"])),
        min_size=1,
        max_size=12,
    ),
    replicas=st.integers(min_value=0, max_value=14),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_placement_does_not_depend_on_member_order(
    key: str, labelled: dict[str, tuple[str, str]], replicas: int, seed: int
) -> None:
    members = {m: {"zone": z, "rack": r} for m, (z, r) in labelled.items()}
    names = list(members)
    random.Random(seed).shuffle(names)
    shuffled = {m: members[m] for m in names}
    got = place(key, members, replicas)
    assert place(key, shuffled, replicas) == got
    assert len(got) == len(set(got)) == min(replicas, len(members))
    # Listed in plain HRW order, whatever the zones (the order says nothing about topology).
    assert got == [m for m in rank(key, list(members)) if m in got]


def test_two_copies_land_in_two_zones_for_every_key() -> None:
    members = two_zones()
    for k in KEYS:
        a, b = place(k, members, 2)
        assert {zone_of(members, a), zone_of(members, b)} == {"a", "b"}, k


def test_copies_are_dealt_evenly_over_zones_and_capped_by_zone_size() -> None:
    members = {**{f"a{i}": {"zone": "a"} for i in range(5)}, "b0": {"zone": "b"}, "c0": {"zone": "c"}}
    for k in KEYS[:300]:
        three = Counter(zone_of(members, n) for n in place(k, members, 3))
        assert three == Counter({"a": 1, "b": 1, "c": 1}), k
        # Zones b and c have one member each: the rest of five copies go to zone a.
        five = Counter(zone_of(members, n) for n in place(k, members, 5))
        assert five == Counter({"a": 3, "b": 1, "c": 1}), k


def test_racks_spread_copies_within_a_zone() -> None:
    one_zone = {f"n{i}": {"zone": "a", "rack": f"r{i % 2}"} for i in range(6)}
    members = two_zones(per_zone=6, racks=3)
    for k in KEYS[:300]:
        assert len({one_zone[n]["rack"] for n in place(k, one_zone, 2)}) == 2, k
        got = place(k, members, 6)
        # Three copies per zone, each on a different rack of that zone.
        for zone in "ab":
            racks = [members[n]["rack"] for n in got if members[n]["zone"] == zone]
            assert sorted(racks) == ["r0", "r1", "r2"], (k, got)


def test_a_dead_owner_is_replaced_by_a_member_of_its_zone_and_no_other_owner_moves() -> None:
    members = two_zones(per_zone=4)
    for k in KEYS:
        before = place(k, members, 2)
        for dead in before:
            rest = {m: labels for m, labels in members.items() if m != dead}
            after = place(k, rest, 2)
            (survivor,) = set(before) - {dead}
            assert survivor in after, (k, before, after)
            (heir,) = set(after) - {survivor}
            assert zone_of(members, heir) == zone_of(members, dead), (k, dead, heir)


def test_a_zone_that_empties_hands_its_copy_to_the_other_zone() -> None:
    members = {"a0": {"zone": "a"}, "b0": {"zone": "b"}, "b1": {"zone": "b"}, "b2": {"zone": "b"}}
    for k in KEYS[:300]:
        before = place(k, members, 2)
        assert "a0" in before
        after = place(k, {m: v for m, v in members.items() if m != "a0"}, 2)
        assert set(before) - {"a0"} <= set(after) and len(after) == 2, (k, before, after)


def test_a_member_that_owned_nothing_leaving_moves_nothing_when_every_zone_has_a_copy() -> None:
    members = two_zones(per_zone=4)
    for k in KEYS:
        before = place(k, members, 2)
        for gone in set(members) - set(before):
            # The same owners (their order, zone by zone, may follow the zones' new weights).
            assert set(place(k, {m: v for m, v in members.items() if m != gone}, 2)) == set(before), (k, gone)


def test_churn_with_more_zones_than_copies_moves_few_keys() -> None:
    """Three zones, two copies: a leaver changes its zone's weight a little, so the zone order of
    a few keys flips. Counted over all keys and every single leaver: under a tenth of the copies
    move besides the leaver's own (plain HRW moves only those)."""
    members = {f"{z}{i}": {"zone": z} for z in "abc" for i in range(4)}
    total = extra = 0
    for gone in members:
        rest = {m: v for m, v in members.items() if m != gone}
        for k in KEYS[:500]:
            before, after = set(place(k, members, 2)), set(place(k, rest, 2))
            moved = before - after - {gone}
            total += 2
            extra += len(moved)
    assert extra / total < 0.10, extra / total


def test_shares_follow_capacity_across_zones() -> None:
    """One copy per key: a zone's share follows its total weight and a member's its own weight."""
    members = {"a0": {"zone": "a"}, "a1": {"zone": "a"}, "b0": {"zone": "b"}}
    weights = {"a0": 1.0, "a1": 1.0, "b0": 2.0}
    keys = [f"k{i}" for i in range(6000)]
    counts = Counter(place(k, members, 1, weights)[0] for k in keys)
    # Expected 1500, 1500, 3000; a binomial sd is at most ~39, so 150 is ~4 sd.
    assert abs(counts["a0"] - 1500) < 150 and abs(counts["a1"] - 1500) < 150 and abs(counts["b0"] - 3000) < 150


def test_the_catalog_owners_spread_across_zones_and_respect_label_constraints() -> None:
    members = [
        Member(node_id=f"{z}{i}", capacity_bytes=64 << 30, labels={"zone": z, "gpu": "h100" if i < 2 else "a10"})
        for z in "ab"
        for i in range(4)
    ]
    for i in range(200):
        entry = CatalogEntry(ref=f"http://origin.test/m{i}.gguf", replicas=2, labels={"gpu": "h100"})
        got = owners_of(entry, members)
        assert {n[0] for n in got} == {"a", "b"} and all(int(n[1]) < 2 for n in got), got


def test_extender_score_gives_a_zone_that_holds_the_model_one_point() -> None:
    assert score(None) == 0 and score(None, zone_holds=True) == 1
    early = Holding(node_id="a", state=JobState.FETCHING, bytes_done=1, bytes_total=100)
    ready = Holding(node_id="a", state=JobState.READY, bytes_done=100, bytes_total=100)
    # A copy here, however early, ranks at least as high as the zone point; a ready one wins.
    assert score(early, zone_holds=True) == score(early) == 1 and score(ready, zone_holds=True) == 10
