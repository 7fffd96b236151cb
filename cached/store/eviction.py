"""Eviction planning: pure, deterministic, unit-tested. The Store executes the frozen plan.

Order: debris first (blobs no manifest uses, partials no job is writing), then models by least
recent use. A protected model (pinned, leased, being fetched, owned by this node) is never chosen.
A model's cost is the bytes it alone holds: blobs shared with a surviving model are not freed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelUsage:
    ref: str
    last_used: float
    blobs: frozenset[str]
    protected: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Debris:
    kind: str  # "blob" | "partial"
    key: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictionPlan:
    debris: tuple[Debris, ...]
    models: tuple[str, ...]
    freed_bytes: int
    # Bytes still over the target after everything evictable is gone (0 when the target is met).
    short_bytes: int


def plan_eviction(
    *,
    models: Sequence[ModelUsage],
    blob_sizes: Mapping[str, int],
    debris: Sequence[Debris],
    used_bytes: int,
    target_bytes: int,
) -> EvictionPlan:
    need = used_bytes - target_bytes
    if need <= 0:
        return EvictionPlan(debris=(), models=(), freed_bytes=0, short_bytes=0)
    freed = 0
    chosen_debris: list[Debris] = []
    for d in sorted(debris, key=lambda d: (-d.size, d.key)):
        if freed >= need:
            break
        chosen_debris.append(d)
        freed += d.size

    refcount: Counter[str] = Counter()
    for m in models:
        refcount.update(m.blobs)
    chosen: list[str] = []
    for m in sorted((m for m in models if not m.protected), key=lambda m: (m.last_used, m.ref)):
        if freed >= need:
            break
        chosen.append(m.ref)
        for b in m.blobs:
            refcount[b] -= 1
            if refcount[b] == 0:
                freed += blob_sizes.get(b, 0)
    return EvictionPlan(
        debris=tuple(chosen_debris), models=tuple(chosen), freed_bytes=freed, short_bytes=max(0, need - freed)
    )


def reclaimable_bytes(*, models: Sequence[ModelUsage], blob_sizes: Mapping[str, int], debris: Sequence[Debris]) -> int:
    """Bytes that eviction could free at most: debris plus blobs held only by unprotected models."""
    keep: set[str] = set()
    for m in models:
        if m.protected:
            keep |= m.blobs
    evictable: set[str] = set()
    for m in models:
        if not m.protected:
            evictable |= m.blobs - keep
    return sum(d.size for d in debris) + sum(blob_sizes.get(b, 0) for b in evictable)
