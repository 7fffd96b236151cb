"""The cluster catalog and the reconcile loop that keeps its replica counts true.

The catalog maps a ref to how many copies the cluster should keep (and optional node-label
constraints, e.g. ``gpu=h100``). It travels in gossip as a last-writer-wins map: an entry with a
later (timestamp, node id) replaces an earlier one; ``replicas = 0`` is a tombstone that removes
the ref everywhere.

Every node runs the same reconcile loop over the same inputs (catalog, live members, holdings):
the owners of a ref are the first ``replicas`` live members in rendezvous-hash order (weighted by
capacity, filtered by labels). An owner without the model fetches it at background priority,
peers first; when an owner dies, the next node in that order becomes an owner and pulls from the
survivors -- no operator action. A copy on a non-owner is kept but evictable (demoted, never
deleted on the spot). Eviction never takes a copy that would leave the cluster below the count.

Only refs every node may fetch for the cluster belong in the catalog: ``file://`` refs (a path on
one node) and ``http(s)://`` refs to an internal address (loopback, link-local such as a cloud
metadata endpoint, unspecified, multicast) are refused when set locally and dropped, counted,
when they arrive by gossip -- otherwise a token holder could make every owner read such a
address and serve what it got back to the cluster.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from yarl import URL

from cached.errors import RefError, RequestError
from cached.jobs import Jobs
from cached.metrics import Metrics
from cached.peers.holdings import HoldingsView
from cached.peers.membership import MemberInfo, Membership, Status
from cached.periodic import every
from cached.placement import rank
from cached.store import Store
from cached.types import ModelRef, Priority, RefKind

log = logging.getLogger(__name__)


def local_only(ref: ModelRef, internal_origins: Collection[str] = ()) -> str | None:
    """Why ``ref`` must stay on the node that names it (None: the cluster may share it).
    ``internal_origins``: host:port the operator lets the catalog name although internal."""
    if ref.kind is RefKind.FILE:
        return "file:// refs are local to one node: they are never replicated, put in the catalog or resolved through peers"
    if ref.kind is RefKind.HTTP:
        url = URL(ref.url)
        if _internal_host(url.host or "") and f"{url.host}:{url.port}" not in internal_origins:
            return (
                f"{url.host} is an internal address (loopback, link-local, unspecified or multicast); such URLs are not "
                "replicated (cluster.internal_origins lists the exceptions)"
            )
    return None


def _internal_host(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        try:
            # What the resolver makes of numeric shorthands ("127.1", "2130706433", "0x7f.1").
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return False  # a host name; what it resolves to is not known here
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogEntry:
    ref: str
    replicas: int
    labels: Mapping[str, str] = field(default_factory=dict)
    updated_at: float = 0.0
    updated_by: str = ""

    @property
    def stamp(self) -> tuple[float, str]:
        return (self.updated_at, self.updated_by)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "replicas": self.replicas, "labels": dict(self.labels),
            "updated_at": self.updated_at, "updated_by": self.updated_by,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CatalogEntry":
        ref = ModelRef.parse(str(d["ref"])).canonical
        replicas = int(d["replicas"])
        if not 0 <= replicas <= 1000:
            raise ValueError("replicas out of range")
        labels = {str(k): str(v) for k, v in dict(d.get("labels") or {}).items()}
        updated_at = float(d["updated_at"])
        if not math.isfinite(updated_at):
            raise ValueError("updated_at must be a finite number")
        return cls(ref=ref, replicas=replicas, labels=labels, updated_at=updated_at, updated_by=str(d["updated_by"]))


class Catalog:
    """Last-writer-wins map of catalog entries. Pure; the clock is injected."""

    def __init__(
        self, node_id: str, *, clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
        internal_origins: Collection[str] = (),
    ) -> None:
        self._node_id = node_id
        self._internal_origins = frozenset(internal_origins)
        self._clock = clock
        self._metrics = metrics
        self._entries: dict[str, CatalogEntry] = {}
        self.dropped: dict[str, int] = {"local_ref": 0, "malformed": 0}

    def set(self, ref: ModelRef, replicas: int, labels: Mapping[str, str] | None = None) -> CatalogEntry:
        why = local_only(ref, self._internal_origins)
        if why is not None:
            raise RequestError(f"cannot replicate {ref}: {why}")
        if not 0 <= replicas <= 1000:
            raise RequestError("replicas must be between 0 and 1000")
        prev = self._entries.get(ref.canonical)
        # Strictly later than what we hold, even if our clock lags the writer's.
        stamp = max(self._clock(), prev.updated_at + 1e-6 if prev else 0.0)
        entry = CatalogEntry(ref=ref.canonical, replicas=replicas, labels=dict(labels or {}), updated_at=stamp, updated_by=self._node_id)
        self._entries[ref.canonical] = entry
        return entry

    def merge(self, entries: list[Any]) -> int:
        changed = 0
        for raw in entries:
            try:
                e = CatalogEntry.from_json(raw)
            except (KeyError, ValueError, TypeError, AttributeError, OverflowError, RefError) as err:
                log.debug("dropping a malformed catalog entry: %s", err)
                self._drop("malformed")
                continue
            why = local_only(ModelRef.parse(e.ref), self._internal_origins)
            if why is not None:
                log.warning("dropping a gossiped catalog entry ref=%s by=%s: %s", e.ref, e.updated_by, why)
                self._drop("local_ref")
                continue
            cur = self._entries.get(e.ref)
            if cur is None or e.stamp > cur.stamp:
                self._entries[e.ref] = e
                changed += 1
        return changed

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._metrics is not None:
            self._metrics.catalog_dropped.labels(reason).inc()

    def entries(self) -> list[CatalogEntry]:
        """Live entries (tombstones hidden)."""
        return [e for e in sorted(self._entries.values(), key=lambda e: e.ref) if e.replicas > 0]

    def get(self, ref: str) -> CatalogEntry | None:
        e = self._entries.get(ref)
        return e if e is not None and e.replicas > 0 else None

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in sorted(self._entries.values(), key=lambda e: e.ref)]

    def to_gossip(self) -> dict[str, Any]:
        """What rides along in every gossip exchange (``Gossip(extra_out=...)``)."""
        return {"catalog": self.to_json()}

    def from_gossip(self, payload: Mapping[str, Any]) -> None:
        """Merge the catalog a gossip message carries (``Gossip(extra_in=...)``)."""
        if isinstance(payload, Mapping):
            self.merge(payload.get("catalog") or [])


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    node_id: str
    capacity_bytes: int
    labels: Mapping[str, str]


def owners_of(entry: CatalogEntry, members: list[Member]) -> list[str]:
    """The ``replicas`` live members that should hold ``entry``, in HRW order."""
    eligible = [m for m in members if all(m.labels.get(k) == v for k, v in entry.labels.items())]
    weights = {m.node_id: max(1.0, m.capacity_bytes / (1 << 30)) for m in eligible}
    return rank(entry.ref, [m.node_id for m in eligible], weights)[: entry.replicas]


class GossipMembers:
    """The reconciler's inputs from gossip: live members and who holds what.

    Placement moves a model only when gossip says its holder is dead (``peer.dead_after_s``), not
    at the first missed heartbeats: a node that is merely slow for a few seconds must not set off
    a full copy elsewhere. Suspect members stay owners and holders until then."""

    def __init__(self, membership: Membership, view: HoldingsView) -> None:
        self._membership = membership
        self._view = view

    def _not_dead(self) -> list[MemberInfo]:
        return [self._membership.me] + [m.info for m in self._membership.members() if m.status is not Status.DEAD]

    def members(self) -> list[Member]:
        return [Member(node_id=i.node_id, capacity_bytes=i.capacity_bytes, labels=i.labels) for i in self._not_dead()]

    def holders(self, ref: str) -> set[str]:
        counted = {i.node_id for i in self._not_dead()}
        return {n for n, _ in self._view.with_ref(ref) if n in counted}


class ReplicaGuard:
    """The store's ``Protector``: eviction asks it whether the cluster can spare a copy.

    The store is built before the cluster parts (the reconciler needs the store, through the
    jobs), so the daemon makes the guard first and gives it to both constructors: the store asks
    it, the reconciler answers through it. Until a reconciler exists, and on a node without a
    cluster, it protects nothing."""

    def __init__(self) -> None:
        self._reconciler: Reconciler | None = None

    def protects(self, ref: str) -> bool:
        return self._reconciler is not None and self._reconciler.protects(ref)

    def answer_with(self, reconciler: "Reconciler") -> None:
        self._reconciler = reconciler


class Reconciler:
    """Compares the catalog with live members and holdings; fetches what this node owns."""

    def __init__(
        self,
        *,
        node_id: str,
        catalog: Catalog,
        store: Store,
        jobs: Jobs,
        members: Callable[[], list[Member]],
        holders: Callable[[str], set[str]],
        interval_s: float,
        guard: ReplicaGuard | None = None,
    ) -> None:
        self._node_id = node_id
        self.catalog = catalog
        self._store = store
        self._jobs = jobs
        self._members = members  # live members, this node included
        self._holders = holders  # node ids (other than us) holding a ready copy of a ref
        self._interval_s = interval_s
        self.passes = 0  # reconcile passes so far (tests wait on it)
        self._wake = asyncio.Event()
        self._owned: set[str] = set()
        if guard is not None:
            guard.answer_with(self)

    def owners(self, ref: str) -> list[str]:
        entry = self.catalog.get(ref)
        return owners_of(entry, self._members()) if entry else []

    def protects(self, ref: str) -> bool:
        """Eviction guard: an owned model, or a copy the cluster cannot spare."""
        if ref in self._owned or self._node_id in self.owners(ref):
            return True
        entry = self.catalog.get(ref)
        if entry is None:
            return False
        return len(self._holders(ref)) + 1 <= entry.replicas

    def demoted(self, ref: str) -> bool:
        """A catalog model held here although this node is not an owner: evictable spare."""
        return self.catalog.get(ref) is not None and self._node_id not in self.owners(ref) and self._store.model(ModelRef.parse(ref)) is not None

    def reconcile(self) -> list[str]:
        """One pass. Returns the refs this node started fetching."""
        self.passes += 1
        members = self._members()
        owned: set[str] = set()
        started: list[str] = []
        for entry in self.catalog.entries():
            if self._node_id not in owners_of(entry, members):
                continue
            owned.add(entry.ref)
            ref = ModelRef.parse(entry.ref)
            job = self._jobs.get(ref)
            if self._store.model(ref) is None and (job is None or not job.active):
                log.info("owner of a catalog model fetching it ref=%s replicas=%d", entry.ref, entry.replicas)
                self._jobs.submit(ref, Priority.LOW)
                started.append(entry.ref)
        for ref in self._owned - owned:
            log.info("no longer an owner; copy kept but evictable ref=%s", ref)
        self._owned = owned
        return started

    def kick(self) -> None:
        """Reconcile now rather than at the next tick: a member just changed status (a failover
        should not wait out the timer)."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self._interval_s, stopping, self.reconcile, now=True, wake=self._wake)


class Locator:
    """Cluster-wide answers: who holds a ref and how far along, by asking each live member."""

    def __init__(
        self,
        *,
        node_id: str,
        local_status: Callable[[ModelRef], dict[str, Any]],
        peers: Callable[[], list[tuple[str, str]]],
        remote_status: Callable[[str, str], Any],
        timeout_s: float = 2.0,
    ) -> None:
        self._node_id = node_id
        self._local = local_status
        self._peers = peers  # live (node id, address) pairs, this node excluded
        self._remote = remote_status  # (address, canonical ref) -> awaitable model object
        self._timeout_s = timeout_s

    async def locate(self, ref: ModelRef) -> list[dict[str, Any]]:
        async def ask(node_id: str, address: str) -> dict[str, Any] | None:
            try:
                return {**await asyncio.wait_for(self._remote(address, ref.canonical), self._timeout_s), "node_id": node_id}
            except Exception as e:  # noqa: BLE001 - an unreachable member is simply not listed
                log.debug("locate: no answer node=%s error=%s", node_id, e)
                return None

        answers = [{**self._local(ref), "node_id": self._node_id}]
        if ref.kind is not RefKind.FILE:  # a file:// ref names a path on this node only
            answers += await asyncio.gather(*(ask(n, a) for n, a in self._peers()))
        out = []
        for a in answers:
            if not a or a.get("state") not in ("ready", "fetching", "queued"):
                continue
            total, done, rate = int(a.get("bytes_total") or 0), int(a.get("bytes_done") or 0), float(a.get("rate_bps") or 0)
            eta = 0.0 if a["state"] == "ready" else (round((total - done) / rate, 1) if rate > 0 and total else None)
            out.append({"node_id": a["node_id"], "state": a["state"], "bytes_done": done, "bytes_total": total, "eta_s": eta})
        return sorted(out, key=lambda n: (n["state"] != "ready", -n["bytes_done"], n["node_id"]))
