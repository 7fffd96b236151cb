"""Rendezvous hashing (cached/placement.py): who owns a key, and what moves when members change.

Every node must compute the same owners from the same member set whatever order it learned the
members in; a join moves about 1/N of the keys, all of them to the newcomer; a leave moves only
the leaver's keys; shares are even, and a member of weight 2 owns about twice the keys of a
member of weight 1. The hash is deterministic, so these figures are fixed: the tolerances only
say what the figures mean (a few binomial standard deviations), they never flake.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from cached.placement import owners, rank, score

KEYS = [f"http://origin.test/models/m-{i}.gguf" for i in range(2000)]
MEMBERS = [f"node-{i}" for i in range(10)]


def owner_map(members: list[str], weights: dict[str, float] | None = None, keys: list[str] = KEYS) -> dict[str, str]:
    return {k: owners(k, members, 1, weights)[0] for k in keys}


def binomial_sd(n: int, p: float) -> float:
    return math.sqrt(n * p * (1 - p))


# --- determinism ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    key=st.text(min_size=1, max_size=40),
    members=st.lists(
        st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=12), min_size=1, max_size=12, unique=True
    ),
    replicas=st.integers(min_value=0, max_value=14),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_owners_do_not_depend_on_member_order(key: str, members: list[str], replicas: int, seed: int) -> None:
    shuffled = members[:]
    random.Random(seed).shuffle(shuffled)
    assert rank(key, shuffled) == rank(key, members)
    assert owners(key, shuffled, replicas) == owners(key, members, replicas)
    assert owners(key, list(reversed(members)), replicas) == owners(key, members, replicas)


def test_order_stability_over_many_keys_with_weights() -> None:
    weights = {m: 1.0 + (i % 3) for i, m in enumerate(MEMBERS)}
    shuffled = MEMBERS[:]
    random.Random(7).shuffle(shuffled)
    for k in KEYS[:300]:
        assert owners(k, shuffled, 3, weights) == owners(k, MEMBERS, 3, weights)


def test_owners_is_a_prefix_of_rank_and_bounded_by_members() -> None:
    key = KEYS[0]
    full = rank(key, MEMBERS)
    assert sorted(full) == sorted(MEMBERS)
    for n in range(len(MEMBERS) + 1):
        assert owners(key, MEMBERS, n) == full[:n]
    assert owners(key, MEMBERS, 50) == full  # more replicas than members: everyone, once
    assert owners(key, MEMBERS, 0) == []
    assert owners(key, MEMBERS, -1) == []
    assert owners(key, [], 3) == []
    assert rank(key, MEMBERS + MEMBERS[:3]) == full  # a member listed twice counts once


def test_scores_are_finite_and_positive() -> None:
    for k in KEYS[:200]:
        for m in MEMBERS:
            s = score(k, m)
            assert math.isfinite(s) and s > 0
            assert score(k, m, 2.0) == 2 * s  # weight scales the score


# --- movement ------------------------------------------------------------------------------------


def test_a_join_moves_about_one_nth_of_the_keys_all_to_the_newcomer() -> None:
    before = owner_map(MEMBERS)
    after = owner_map(MEMBERS + ["node-new"])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert {after[k] for k in moved} == {"node-new"}, "a join may only move keys to the new member"
    assert all(after[k] == "node-new" for k in moved)
    p = 1 / (len(MEMBERS) + 1)
    expected, sd = len(KEYS) * p, binomial_sd(len(KEYS), p)
    assert abs(len(moved) - expected) < 4 * sd, (len(moved), expected)


def test_a_leave_moves_only_the_leavers_keys_to_their_next_choice() -> None:
    leaver = MEMBERS[3]
    before = owner_map(MEMBERS)
    after = owner_map([m for m in MEMBERS if m != leaver])
    for k in KEYS:
        if before[k] == leaver:
            assert after[k] == rank(k, MEMBERS)[1], "the next member in HRW order takes over"
        else:
            assert after[k] == before[k], "a key the leaver did not own must not move"
    p = 1 / len(MEMBERS)
    held = sum(1 for k in KEYS if before[k] == leaver)
    assert abs(held - len(KEYS) * p) < 4 * binomial_sd(len(KEYS), p)


def test_with_replicas_a_leave_keeps_the_survivors_and_adds_the_next_in_order() -> None:
    leaver = MEMBERS[5]
    rest = [m for m in MEMBERS if m != leaver]
    for k in KEYS[:500]:
        old, new = owners(k, MEMBERS, 3), owners(k, rest, 3)
        if leaver not in old:
            assert new == old
        else:
            assert set(old) - {leaver} <= set(new)
            assert new == [m for m in rank(k, MEMBERS) if m != leaver][:3]


# --- balance and weights -------------------------------------------------------------------------


def test_keys_spread_evenly_over_members() -> None:
    counts = Counter(owner_map(MEMBERS).values())
    assert set(counts) == set(MEMBERS)
    expected = len(KEYS) / len(MEMBERS)
    chi2 = sum((counts[m] - expected) ** 2 / expected for m in MEMBERS)
    # 9 degrees of freedom: the 99.9th percentile of chi-square is 27.88.
    assert chi2 < 27.88, (chi2, counts)
    assert all(abs(counts[m] - expected) < 4 * binomial_sd(len(KEYS), 1 / len(MEMBERS)) for m in MEMBERS), counts


def test_a_member_of_weight_two_owns_about_twice_the_keys() -> None:
    keys = [f"hf://org/model-{i}" for i in range(4000)]
    weights = {m: 1.0 for m in MEMBERS}
    weights["node-0"] = 2.0
    counts = Counter(owner_map(MEMBERS, weights, keys).values())
    total_w = sum(weights.values())
    for m in MEMBERS:
        p = weights[m] / total_w
        assert abs(counts[m] - len(keys) * p) < 4 * binomial_sd(len(keys), p), (m, counts[m], len(keys) * p)
    others = sum(counts[m] for m in MEMBERS[1:]) / (len(MEMBERS) - 1)
    assert 1.7 < counts["node-0"] / others < 2.3, counts


def test_equal_weights_of_any_size_change_nothing() -> None:
    same = {m: 300.0 for m in MEMBERS}  # e.g. every node has 300 GiB
    assert owner_map(MEMBERS, same) == owner_map(MEMBERS)


def test_raising_one_weight_only_moves_keys_to_that_member() -> None:
    before = owner_map(MEMBERS)
    after = owner_map(MEMBERS, {"node-4": 3.0})
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(after[k] == "node-4" for k in moved)
