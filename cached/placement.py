"""Rendezvous (highest-random-weight) hashing: which nodes own a key. Pure and deterministic.

Every node computes the same answer from the same member list, with no coordination: a score per
(key, member), the highest scores win. When a member joins or leaves only the keys it wins or
held move (about 1/N of them). Weights scale a member's share (e.g. by capacity) with the
logarithmic method, so a member of weight 2 owns about twice the keys of a member of weight 1.

``place`` adds topology: members labelled with a zone (and a rack) get a key's copies spread
across zones first, racks second, with the same stability (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import blake3

_MAX = float(1 << 64)


def score(key: str, member: str, weight: float = 1.0) -> float:
    h = int.from_bytes(blake3.blake3(f"{key}\0{member}".encode()).digest(8), "big")
    u = (h + 0.5) / _MAX  # in (0, 1), never 0 or 1
    return -weight / math.log(u)


def rank(key: str, members: Iterable[str], weights: Mapping[str, float] | None = None) -> list[str]:
    """Members in HRW order for ``key``: the first is the owner, the next take over in turn."""
    w = weights or {}
    return sorted(set(members), key=lambda m: (-score(key, m, w.get(m, 1.0)), m))


def owners(key: str, members: Iterable[str], replicas: int, weights: Mapping[str, float] | None = None) -> list[str]:
    return rank(key, members, weights)[: max(0, replicas)]


# --- topology: spreading copies across zones and racks ---------------------------------------

ZONE_LABEL = "zone"  # CONTRACT: labels.zone
RACK_LABEL = "rack"  # CONTRACT: labels.rack


def place(
    key: str,
    members: Mapping[str, Mapping[str, str]],
    replicas: int,
    weights: Mapping[str, float] | None = None,
) -> list[str]:
    """The ``replicas`` owners of ``key`` among ``members`` (node id -> its labels), spread
    across zones first, then across racks within a zone.

    Zones are ranked for the key by HRW over the zone's name, weighted by the zone's total member
    weight (so a zone's share of first copies follows its capacity); racks within a zone the same
    way; members within a rack by their own HRW score. Copies are then dealt round-robin: one per
    zone in zone order, then a second per zone, and so on (a zone with fewer members than its turn
    is skipped); inside a zone the same dealing goes across its racks. So with two zones,
    ``replicas = 2`` puts one copy in each, whatever the capacities.

    Why ranking whole zones rather than taking the best members greedily: when an owner dies its
    zone keeps its rank (its weight changes only a little), so its heir is the next member of the
    same zone, and no surviving owner loses its role -- the spread holds and only the dead node's
    copy moves. A member with no ``zone`` label is in the unnamed zone "" (likewise racks); when no
    member is labelled this is exactly ``owners`` (plain HRW). The owners are listed in plain HRW
    order whatever their zones."""
    w = weights or {}
    zones: dict[str, dict[str, list[str]]] = {}
    for m, labels in members.items():
        zones.setdefault(labels.get(ZONE_LABEL, ""), {}).setdefault(labels.get(RACK_LABEL, ""), []).append(m)

    def weight(ms: Iterable[str]) -> float:
        return sum(w.get(m, 1.0) for m in ms)

    zone_lists = []
    for zone in _ranked(key, {z: weight(m for ms in racks.values() for m in ms) for z, racks in zones.items()}, "zone"):
        racks = zones[zone]
        rack_order = _ranked(key, {r: weight(ms) for r, ms in racks.items()}, f"rack\0{zone}")
        zone_lists.append(_deal([rank(key, racks[r], w) for r in rack_order]))
    chosen = set(_deal(zone_lists)[: max(0, replicas)])
    # Listed in plain HRW order, as ``owners`` lists them: the order says nothing about zones.
    return [m for m in rank(key, members, w) if m in chosen]


def _ranked(key: str, groups: Mapping[str, float], kind: str) -> list[str]:
    """Group names in HRW order for ``key`` (a group's score weighted by its total weight)."""
    return sorted(groups, key=lambda g: (-score(key, f"{kind}\0{g}", groups[g]), g))


def _deal(lists: list[list[str]]) -> list[str]:
    """Round-robin: the first of each list, then the second of each, ... (short lists skipped)."""
    out: list[str] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out
