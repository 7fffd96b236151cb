"""The cluster catalog (cached/cluster.py): a last-writer-wins map, and who owns an entry.

An entry with a later (updated_at, updated_by) replaces an earlier one, equal timestamps are
settled by node id, older news is ignored; ``replicas = 0`` is a tombstone that hides the ref and
beats any older set; entries that do not parse are dropped one by one without spoiling the rest
of the batch, whatever a peer sends; refs only one node may name (file://, http to an internal
address) are refused locally and dropped, counted, from gossip (issue 18). ``owners_of`` picks among the members whose labels match.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cached.cluster import Catalog, CatalogEntry, Member, Reconciler, local_only, owners_of
from cached.errors import RequestError
from cached.placement import rank
from cached.types import ModelRef

REF = "http://origin.test/models/llama.gguf"
OTHER = "hf://org/other@main"
GIB = 1 << 30


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def raw(ref: str = REF, replicas: int = 2, at: float = 100.0, by: str = "a", **labels: str) -> dict[str, Any]:
    return {"ref": ref, "replicas": replicas, "labels": labels, "updated_at": at, "updated_by": by}


def state(c: Catalog) -> dict[str, tuple[int, dict[str, str], float, str]]:
    return {e["ref"]: (e["replicas"], e["labels"], e["updated_at"], e["updated_by"]) for e in c.to_json()}


# --- last writer wins ----------------------------------------------------------------------------


def test_a_later_stamp_wins_and_an_older_one_is_ignored() -> None:
    c = Catalog("me")
    assert c.merge([raw(replicas=2, at=100.0)]) == 1
    assert c.merge([raw(replicas=5, at=200.0, by="b")]) == 1
    assert c.get(REF) is not None and c.get(REF).replicas == 5
    assert c.merge([raw(replicas=1, at=150.0, by="z")]) == 0  # older, even from a "larger" node id
    assert c.merge([raw(replicas=5, at=200.0, by="b")]) == 0  # the same entry again changes nothing
    assert c.get(REF).replicas == 5
    assert c.get(REF).stamp == (200.0, "b")


def test_equal_timestamps_are_settled_by_node_id_in_any_order() -> None:
    low, high = raw(replicas=1, at=100.0, by="node-a"), raw(replicas=3, at=100.0, by="node-b")
    for batch in ([low, high], [high, low]):
        c = Catalog("me")
        c.merge(batch)
        assert c.get(REF).replicas == 3 and c.get(REF).updated_by == "node-b"
    c = Catalog("me")
    c.merge([high])
    assert c.merge([low]) == 0


def test_a_tombstone_hides_the_entry_and_beats_an_older_set() -> None:
    c = Catalog("me")
    c.merge([raw(replicas=3, at=100.0), raw(OTHER, replicas=1, at=100.0)])
    assert c.merge([raw(replicas=0, at=200.0, by="b")]) == 1
    assert c.get(REF) is None
    assert [e.ref for e in c.entries()] == [OTHER]
    # The tombstone still travels, so that peers which missed the removal learn of it.
    assert state(c)[REF][0] == 0
    # An older set (a peer that has not heard yet) does not bring the ref back ...
    assert c.merge([raw(replicas=3, at=150.0, by="z")]) == 0
    assert c.get(REF) is None
    # ... a newer one does.
    assert c.merge([raw(replicas=1, at=300.0, by="a")]) == 1
    assert c.get(REF).replicas == 1


def test_a_local_set_outranks_what_it_replaces_even_when_the_clock_lags() -> None:
    clock = Clock(50.0)
    c = Catalog("me", clock=clock)
    c.merge([raw(replicas=2, at=100.0, by="zz")])  # written by a node whose clock runs ahead
    e = c.set(ModelRef.parse(REF), 0)
    assert e.stamp > (100.0, "zz")
    assert c.get(REF) is None
    # The new stamp wins on every peer that still holds the old entry.
    peer = Catalog("peer")
    peer.merge([raw(replicas=2, at=100.0, by="zz")])
    assert peer.merge(c.to_json()) == 1 and peer.get(REF) is None


def test_set_canonicalises_the_ref_and_keeps_labels() -> None:
    clock = Clock(10.0)
    c = Catalog("me", clock=clock)
    e = c.set(ModelRef.parse(REF), 2, {"gpu": "h100"})
    assert (e.ref, e.replicas, dict(e.labels), e.updated_at, e.updated_by) == (REF, 2, {"gpu": "h100"}, 10.0, "me")
    assert CatalogEntry.from_json(e.to_json()) == e


@pytest.mark.parametrize("replicas", [-1, 1001])
def test_set_refuses_replicas_out_of_range(replicas: int) -> None:
    with pytest.raises(RequestError):
        Catalog("me").set(ModelRef.parse(REF), replicas)


# --- malformed entries ---------------------------------------------------------------------------

MALFORMED = [
    pytest.param(None, id="null"),
    pytest.param("http://origin.test/x", id="a-string"),
    pytest.param(["ref", 1], id="a-list"),
    pytest.param({}, id="empty-object"),
    pytest.param({"ref": REF, "replicas": 2, "updated_at": 1.0}, id="no-updated_by"),
    pytest.param({"ref": REF, "replicas": 2, "updated_by": "a"}, id="no-updated_at"),
    pytest.param({"replicas": 2, "updated_at": 1.0, "updated_by": "a"}, id="no-ref"),
    pytest.param(raw(replicas=-1), id="replicas-negative"),
    pytest.param(raw(replicas=1001), id="replicas-too-many"),
    pytest.param({**raw(), "replicas": "many"}, id="replicas-a-word"),
    pytest.param({**raw(), "replicas": None}, id="replicas-null"),
    pytest.param({**raw(), "updated_at": "yesterday"}, id="updated_at-a-word"),
    pytest.param({**raw(), "updated_at": None}, id="updated_at-null"),
    pytest.param({**raw(), "labels": [1, 2]}, id="labels-a-list"),
    pytest.param({**raw(), "labels": "gpu=h100"}, id="labels-a-string"),
    pytest.param(raw(ref=""), id="ref-empty"),
    pytest.param(raw(ref="not a ref"), id="ref-unparsable"),
    pytest.param(raw(ref="gopher://bucket/model"), id="ref-unknown-scheme"),  # e.g. from a newer peer
    pytest.param({**raw(), "updated_at": float("nan")}, id="updated_at-nan"),  # never replaced again
    pytest.param({**raw(), "updated_at": float("inf")}, id="updated_at-inf"),  # wins forever
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_a_malformed_entry_is_dropped_and_the_rest_of_the_batch_kept(bad: Any) -> None:
    c = Catalog("me")
    changed = c.merge([bad, raw(OTHER, replicas=1, at=5.0, by="b")])
    assert changed == 1
    assert [e.ref for e in c.entries()] == [OTHER]
    assert REF not in state(c)
    # Nothing of the bad entry lingers: a well-formed entry for its ref is taken as usual.
    assert c.merge([raw(replicas=2, at=6.0, by="b")]) == 1
    assert c.get(REF) is not None and c.get(REF).replicas == 2


# --- refs the cluster must not share ------------------------------------------------------------

LOCAL_ONLY = [
    "file:///etc/shadow",
    "file://localhost/etc/cached/cluster.token",
    "http://127.0.0.1:8080/x.gguf",
    "http://127.1/x.gguf",
    "http://2130706433/x.gguf",
    "http://0x7f000001/x.gguf",
    "https://localhost/x.gguf",
    "http://LOCALHOST./x.gguf",
    "http://api.localhost/x.gguf",
    "http://169.254.169.254/latest/meta-data/iam.json",
    "http://[fe80::1]/x.gguf",
    "http://[::1]:9/x.gguf",
    "http://[::ffff:127.0.0.1]/x.gguf",
    "http://0.0.0.0/x.gguf",
    "http://[::]/x.gguf",
    "http://224.0.0.251/x.gguf",
    "http://[ff02::fb]/x.gguf",
]
SHAREABLE = [
    "hf://org/llama@main",
    REF,
    "https://10.0.0.5/m.gguf",
    "http://192.168.1.9:8000/m.gguf",
    "https://huggingface.co/x/y.bin",
]


@pytest.mark.parametrize("ref", LOCAL_ONLY)
def test_a_local_only_ref_from_gossip_is_dropped_and_counted(ref: str) -> None:
    assert local_only(ModelRef.parse(ref)) is not None
    c = Catalog("me")
    assert c.merge([raw(ref, replicas=3, at=5.0, by="evil"), raw(OTHER, replicas=1, at=5.0, by="b")]) == 1
    assert [e.ref for e in c.entries()] == [OTHER]
    assert c.dropped["local_ref"] == 1


@pytest.mark.parametrize("ref", LOCAL_ONLY)
def test_a_local_only_ref_cannot_be_set(ref: str) -> None:
    c = Catalog("me")
    with pytest.raises(RequestError, match="cannot replicate"):
        c.set(ModelRef.parse(ref), 2)
    assert c.entries() == []


@pytest.mark.parametrize("ref", SHAREABLE)
def test_refs_every_node_may_fetch_are_shareable(ref: str) -> None:
    assert local_only(ModelRef.parse(ref)) is None
    assert Catalog("me").merge([raw(ref)]) == 1


# --- convergence ---------------------------------------------------------------------------------

entries = st.builds(
    raw,
    ref=st.sampled_from([REF, OTHER, "https://models.example/x.gguf"]),
    replicas=st.integers(min_value=0, max_value=4),
    at=st.sampled_from([1.0, 2.0, 3.0]),  # few values, so that ties are common
    by=st.sampled_from(["a", "b", "c"]),
)


@settings(max_examples=80, deadline=None)
@given(batch=st.lists(entries, max_size=8), split=st.integers(min_value=0, max_value=8))
def test_every_order_and_grouping_of_merges_converges(batch: list[dict[str, Any]], split: int) -> None:
    # Two entries with one stamp and different content cannot come from one writer; skip them.
    stamps = {}
    for e in batch:
        stamps.setdefault((e["ref"], e["updated_at"], e["updated_by"]), e)
    batch = list(stamps.values())
    whole = Catalog("x")
    whole.merge(batch)
    for perm in itertools.islice(itertools.permutations(batch), 24):
        a = Catalog("y")
        a.merge(list(perm[:split]))
        a.merge(list(perm[split:]))
        assert state(a) == state(whole)


# --- owners_of -----------------------------------------------------------------------------------


def members() -> list[Member]:
    return [
        Member(node_id="a", capacity_bytes=100 * GIB, labels={"gpu": "a100", "zone": "z1"}),
        Member(node_id="b", capacity_bytes=100 * GIB, labels={"gpu": "h100", "zone": "z1"}),
        Member(node_id="c", capacity_bytes=100 * GIB, labels={"gpu": "h100", "zone": "z2"}),
        Member(node_id="d", capacity_bytes=100 * GIB, labels={}),
        Member(node_id="e", capacity_bytes=100 * GIB, labels={"gpu": "h100", "zone": "z2"}),
    ]


def entry(replicas: int, **labels: str) -> CatalogEntry:
    return CatalogEntry(ref=REF, replicas=replicas, labels=labels, updated_at=1.0, updated_by="a")


def test_owners_of_without_labels_is_hrw_over_every_member() -> None:
    ms = members()
    assert owners_of(entry(2), ms) == rank(REF, [m.node_id for m in ms])[:2]
    assert sorted(owners_of(entry(10), ms)) == ["a", "b", "c", "d", "e"]


def test_owners_of_only_picks_members_whose_labels_match() -> None:
    ms = members()
    assert sorted(owners_of(entry(5, gpu="h100"), ms)) == ["b", "c", "e"]
    assert owners_of(entry(2, gpu="h100"), ms) == rank(REF, ["b", "c", "e"])[:2]
    assert owners_of(entry(5, gpu="h100", zone="z2"), ms) == rank(REF, ["c", "e"])  # every label must match
    assert owners_of(entry(5, gpu="tpu"), ms) == []
    assert owners_of(entry(5, zone="z1"), ms) == rank(REF, ["a", "b"])
    # The eligible set changes only with labels, not with who else is around.
    assert sorted(owners_of(entry(5, gpu="h100"), [m for m in ms if m.node_id != "a"])) == ["b", "c", "e"]


def test_owners_of_weighs_members_by_capacity() -> None:
    keys = [f"http://origin.test/m-{i}" for i in range(3000)]
    ms = [Member(node_id="big", capacity_bytes=200 * GIB, labels={})] + [
        Member(node_id=f"n{i}", capacity_bytes=100 * GIB, labels={}) for i in range(3)
    ]
    counts: dict[str, int] = {}
    for k in keys:
        first = owners_of(CatalogEntry(ref=k, replicas=1, updated_at=1.0, updated_by="a"), ms)[0]
        counts[first] = counts.get(first, 0) + 1
    # big has weight 2 of a total 5: about 2/5 of the keys.
    p = 2 / 5
    assert abs(counts["big"] - len(keys) * p) < 4 * math.sqrt(len(keys) * p * (1 - p)), counts


def test_small_or_unknown_capacities_weigh_the_same() -> None:
    # Below 1 GiB (or 0: a peer that has not said) a member counts as weight 1, never 0.
    tiny = [Member(node_id=n, capacity_bytes=c, labels={}) for n, c in (("a", 0), ("b", 16 << 20), ("c", GIB))]
    for i in range(200):
        e = CatalogEntry(ref=f"http://origin.test/m-{i}", replicas=2, updated_at=1.0, updated_by="a")
        assert owners_of(e, tiny) == rank(e.ref, ["a", "b", "c"])[:2]


# --- the reconciler's guards ---------------------------------------------------------------------


class FakeStore:
    """Just what the Reconciler asks a store: is a ref ready here."""

    def __init__(self, ready: set[str]) -> None:
        self.ready = ready

    def model(self, ref: ModelRef) -> object | None:
        return object() if ref.canonical in self.ready else None


class FakeJobs:
    def __init__(self) -> None:
        self.submitted: list[str] = []

    def get(self, ref: ModelRef) -> None:
        return None

    def submit(self, ref: ModelRef, priority: object) -> None:
        self.submitted.append(ref.canonical)


def reconciler(me: str, live: list[str], holders: set[str], ready: set[str]) -> tuple[Reconciler, FakeJobs]:
    jobs = FakeJobs()
    r = Reconciler(
        node_id=me,
        catalog=Catalog(me),
        store=FakeStore(ready),
        jobs=jobs,  # type: ignore[arg-type]
        members=lambda: [Member(node_id=n, capacity_bytes=GIB, labels={}) for n in live],
        holders=lambda ref: set(holders),
        interval_s=1.0,
    )
    return r, jobs


def test_an_owner_fetches_a_non_owner_does_not() -> None:
    nodes = ["a", "b", "c", "d"]
    first, second = rank(REF, nodes)[:2]
    (outsider,) = [n for n in nodes if n not in (first, second)][:1]
    for me, fetches in ((first, True), (second, True), (outsider, False)):
        r, jobs = reconciler(me, nodes, holders=set(), ready=set())
        r.catalog.merge([raw(replicas=2)])
        assert r.reconcile() == ([REF] if fetches else [])
        assert jobs.submitted == ([REF] if fetches else [])


def test_a_spare_copy_is_evictable_only_while_enough_others_hold_it() -> None:
    nodes = ["a", "b", "c", "d"]
    first, second, third, _ = rank(REF, nodes)
    r, _ = reconciler(third, nodes, holders={first, second}, ready={REF})
    r.catalog.merge([raw(replicas=2)])
    r.reconcile()
    assert r.demoted(REF) and not r.protects(REF)
    # One owner lost its copy: the spare is one of the two copies the catalog asks for.
    r2, _ = reconciler(third, nodes, holders={first}, ready={REF})
    r2.catalog.merge([raw(replicas=2)])
    r2.reconcile()
    assert r2.demoted(REF) and r2.protects(REF)


def test_ownership_counts_from_the_moment_the_catalog_or_members_say_so() -> None:
    # A node whose catalog just learned (by gossip) that it owns a ref it holds must not call its
    # copy a spare, nor leave it unprotected, until its next reconcile pass: the model object
    # would list it among the owners and say spare, and a gc in between would evict an owner.
    nodes = ["a", "b", "c", "d"]
    first, second, third, _ = rank(REF, nodes)
    r, _ = reconciler(first, nodes, holders={second, third}, ready={REF})
    r.reconcile()  # a pass before the entry arrives
    r.catalog.merge([raw(replicas=2)])
    assert first in r.owners(REF)
    assert r.demoted(REF) is False
    assert r.protects(REF) is True
    # The same when a member comes back: ownership moves back to it at once.
    r2, _ = reconciler(first, [n for n in nodes if n != first], holders={second, third}, ready={REF})
    r2.catalog.merge([raw(replicas=2)])
    r2.reconcile()
    assert r2.demoted(REF) is True
