"""Rendezvous (highest-random-weight) hashing: which nodes own a key. Pure and deterministic.

Every node computes the same answer from the same member list, with no coordination: a score per
(key, member), the highest scores win. When a member joins or leaves only the keys it wins or
held move (about 1/N of them). Weights scale a member's share (e.g. by capacity) with the
logarithmic method, so a member of weight 2 owns about twice the keys of a member of weight 1.
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
