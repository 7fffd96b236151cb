"""Eviction planning: debris first, then least recently used models; protected models are never
chosen; a blob still used by a surviving model is not counted as freed.

The properties compare the plan with an independent account of what deleting its choices frees.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.store.eviction import Debris, EvictionPlan, ModelUsage, plan_eviction, reclaimable_bytes

# See test_types.py: the loop guard fails a plain test that runs past 1 s.
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

BLOBS = [f"b{i}" for i in range(10)]


def freed_by(
    models_gone: set[str], debris_gone: Sequence[Debris], models: Sequence[ModelUsage], blob_sizes: dict[str, int]
) -> int:
    """Bytes actually released by deleting these models and this debris, and nothing else."""
    kept: set[str] = set()
    gone: set[str] = set()
    for m in models:
        (gone if m.ref in models_gone else kept).update(m.blobs)
    return sum(d.size for d in debris_gone) + sum(blob_sizes.get(b, 0) for b in gone - kept)


@st.composite
def worlds(draw: st.DrawFn) -> dict:
    # Few, wide draws keep generation cheap: blob sets are bit masks, sizes come from bytes.
    size_bytes = draw(st.binary(min_size=len(BLOBS), max_size=len(BLOBS)))
    present = draw(st.integers(0, (1 << len(BLOBS)) - 1))
    blob_sizes = {b: size_bytes[i] * 4 for i, b in enumerate(BLOBS) if present >> i & 1}
    rows = draw(
        st.lists(st.tuples(st.integers(0, 20), st.integers(0, (1 << len(BLOBS)) - 1), st.booleans()), max_size=8)
    )
    models = [
        ModelUsage(
            ref=f"hf://org/m{i}@main",
            last_used=last_used,  # small range: ties happen
            blobs=frozenset(b for j, b in enumerate(BLOBS) if mask >> j & 1),
            protected=protected,
        )
        for i, (last_used, mask, protected) in enumerate(rows)
    ]
    debris_sizes = draw(st.binary(max_size=5))
    debris = [Debris(kind="blob" if i % 2 else "partial", key=f"d{i}", size=n * 2) for i, n in enumerate(debris_sizes)]
    total = sum(d.size for d in debris) + sum(blob_sizes.values())
    used = draw(st.integers(0, total + 200))
    target = draw(st.integers(0, used + 200))
    return dict(models=models, blob_sizes=blob_sizes, debris=debris, used_bytes=used, target_bytes=target)


def plan(w: dict) -> EvictionPlan:
    return plan_eviction(**w)


@PROPS
@given(worlds())
def test_plan_frees_what_it_claims_and_never_touches_protected_models(w: dict) -> None:
    p = plan(w)
    by_ref = {m.ref: m for m in w["models"]}
    assert len(set(p.models)) == len(p.models)
    assert all(ref in by_ref and not by_ref[ref].protected for ref in p.models)
    assert len({d.key for d in p.debris}) == len(p.debris)
    assert all(d in w["debris"] for d in p.debris)
    assert p.freed_bytes == freed_by(set(p.models), p.debris, w["models"], w["blob_sizes"])


@PROPS
@given(worlds())
def test_plan_meets_the_target_when_enough_is_evictable_and_reports_the_shortfall_otherwise(w: dict) -> None:
    p = plan(w)
    need = w["used_bytes"] - w["target_bytes"]
    if need <= 0:
        assert p == EvictionPlan(debris=(), models=(), freed_bytes=0, short_bytes=0)
        return
    reclaimable = reclaimable_bytes(models=w["models"], blob_sizes=w["blob_sizes"], debris=w["debris"])
    assert p.short_bytes == max(0, need - p.freed_bytes)
    if reclaimable >= need:
        assert p.freed_bytes >= need
        assert p.short_bytes == 0
    else:
        # Everything evictable goes, and that is exactly what reclaimable_bytes promised.
        assert p.freed_bytes == reclaimable
        assert p.short_bytes == need - reclaimable > 0
        assert set(p.models) == {m.ref for m in w["models"] if not m.protected}
        assert len(p.debris) == len(w["debris"])


@PROPS
@given(worlds())
def test_debris_goes_before_any_model_and_models_go_least_recently_used_first(w: dict) -> None:
    p = plan(w)
    if p.models:
        assert len(p.debris) == len(w["debris"])
    unprotected = sorted((m for m in w["models"] if not m.protected), key=lambda m: (m.last_used, m.ref))
    assert list(p.models) == [m.ref for m in unprotected[: len(p.models)]]
    last_used = {m.ref: m.last_used for m in w["models"]}
    for ref in p.models:
        for m in unprotected:
            if m.ref not in p.models:
                assert m.last_used >= last_used[ref]


@PROPS
@given(worlds())
def test_plan_stops_as_soon_as_the_target_is_met(w: dict) -> None:
    p = plan(w)
    need = w["used_bytes"] - w["target_bytes"]
    if not p.models and not p.debris:
        return
    # Without its last choice the plan would fall short: nothing is evicted needlessly.
    if p.models:
        before = freed_by(set(p.models[:-1]), p.debris, w["models"], w["blob_sizes"])
    else:
        before = freed_by(set(), p.debris[:-1], w["models"], w["blob_sizes"])
    assert before < need


@PROPS
@given(worlds())
def test_reclaimable_bytes_is_what_evicting_every_unprotected_model_and_all_debris_frees(w: dict) -> None:
    everything = {m.ref for m in w["models"] if not m.protected}
    expect = freed_by(everything, w["debris"], w["models"], w["blob_sizes"])
    assert reclaimable_bytes(models=w["models"], blob_sizes=w["blob_sizes"], debris=w["debris"]) == expect


# --- worked examples -----------------------------------------------------------------------------


def test_a_blob_shared_with_a_newer_model_is_not_counted_until_both_go() -> None:
    sizes = {"shared": 1000, "old-only": 10, "new-only": 20}
    models = [
        ModelUsage(ref="old", last_used=1, blobs=frozenset({"shared", "old-only"})),
        ModelUsage(ref="new", last_used=2, blobs=frozenset({"shared", "new-only"})),
    ]
    small = plan_eviction(models=models, blob_sizes=sizes, debris=[], used_bytes=1030, target_bytes=1025)
    assert small.models == ("old",)
    assert small.freed_bytes == 10
    big = plan_eviction(models=models, blob_sizes=sizes, debris=[], used_bytes=1030, target_bytes=500)
    assert big.models == ("old", "new")
    assert big.freed_bytes == 1030 and big.short_bytes == 0


def test_a_blob_shared_with_a_protected_model_is_never_counted() -> None:
    sizes = {"shared": 1000, "mine": 10}
    models = [
        ModelUsage(ref="evictable", last_used=1, blobs=frozenset({"shared", "mine"})),
        ModelUsage(ref="pinned", last_used=0, blobs=frozenset({"shared"}), protected=True),
    ]
    debris = [Debris(kind="partial", key="p1", size=5)]
    p = plan_eviction(models=models, blob_sizes=sizes, debris=debris, used_bytes=1015, target_bytes=0)
    assert p.models == ("evictable",)
    assert p.freed_bytes == 15
    assert p.short_bytes == 1000
    assert reclaimable_bytes(models=models, blob_sizes=sizes, debris=debris) == 15


def test_enough_debris_spares_every_model() -> None:
    models = [ModelUsage(ref="old", last_used=0, blobs=frozenset({"a"}))]
    debris = [Debris(kind="blob", key="x", size=300), Debris(kind="partial", key="y", size=700)]
    p = plan_eviction(models=models, blob_sizes={"a": 100}, debris=debris, used_bytes=2000, target_bytes=1400)
    assert p.models == ()
    assert sum(d.size for d in p.debris) == p.freed_bytes >= 600
