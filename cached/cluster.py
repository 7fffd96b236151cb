"""The cluster catalog and the reconcile loop that keeps its replica counts true.

The catalog maps a ref to how many copies the cluster should keep (and optional node-label
constraints, e.g. ``gpu=h100``). It travels in gossip as a last-writer-wins map: an entry with a
later (timestamp, node id) replaces an earlier one; ``replicas = 0`` is a tombstone that removes
the ref everywhere.

Every node runs the same reconcile loop over the same inputs (catalog, live members, holdings):
the owners of a ref are the first ``replicas`` live members in rendezvous-hash order (weighted by
capacity, filtered by labels), spread across zones and then racks (``labels.zone``,
``labels.rack``) when members carry them: with two zones, two copies land one in each, and the
heir of a dead owner is a member of its zone while that zone has one. An owner without the model fetches it at background priority,
peers first; when an owner dies, the next node in that order becomes an owner and pulls from the
survivors -- no operator action. A copy on a non-owner is kept but evictable (demoted, never
deleted on the spot). Eviction never takes a copy that would leave the cluster below the count.

Only refs every node may fetch for the cluster belong in the catalog: ``file://`` refs (a path on
one node) and ``http(s)://`` refs to an internal address (loopback, link-local such as a cloud
metadata endpoint, unspecified, multicast) are refused when set locally and dropped, counted,
when they arrive by gossip -- otherwise a token holder could make every owner read such a
address and serve what it got back to the cluster.

``CatalogStatus`` adds the catalog's replica plan to this node's model status (``cached.status``);
``Locator`` answers who holds a model across the cluster and how far along.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from cached.errors import RefError, RequestError
from cached.jobs import Jobs
from cached.metrics import Metrics
from cached.peers.client import PeerClient
from cached.peers.holdings import HoldingsView, NodeHoldings
from cached.peers.membership import MemberInfo, Membership, Status
from cached.periodic import every
from cached.placement import RACK_LABEL, ZONE_LABEL, place
from cached.status import ModelStatus, Replicas, StatusSource
from cached.store import Store
from cached.types import FileEntry, JobState, Manifest, ModelRef, OriginFile, Priority, RefKind

log = logging.getLogger(__name__)

MANIFESTS_KEPT = 64  # peers' manifests remembered for ``Locator.holders`` (immutable by digest)
MANIFEST_ASKS = 3  # holders asked for a manifest before in-flight copies go unseen for this call


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
            "ref": self.ref,
            "replicas": self.replicas,
            "labels": dict(self.labels),
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CatalogEntry:
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
        self,
        node_id: str,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
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
        entry = CatalogEntry(
            ref=ref.canonical, replicas=replicas, labels=dict(labels or {}), updated_at=stamp, updated_by=self._node_id
        )
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
    """The ``replicas`` live members that should hold ``entry``: HRW weighted by capacity, the
    copies spread across the members' ``zone`` labels first and ``rack`` labels second
    (``placement.place``; with no such labels, plain HRW order)."""
    eligible = [m for m in members if all(m.labels.get(k) == v for k, v in entry.labels.items())]
    weights = {m.node_id: max(1.0, m.capacity_bytes / (1 << 30)) for m in eligible}
    return place(entry.ref, {m.node_id: m.labels for m in eligible}, entry.replicas, weights)


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

    def answer_with(self, reconciler: Reconciler) -> None:
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
        return (
            self.catalog.get(ref) is not None
            and self._node_id not in self.owners(ref)
            and self._store.model(ModelRef.parse(ref)) is not None
        )

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


class CatalogStatus:
    """This node's model status with the catalog's replica plan for the ref, when it has one."""

    def __init__(self, local: StatusSource, reconciler: Reconciler) -> None:
        self._local = local
        self._reconciler = reconciler

    def of(self, ref: ModelRef) -> ModelStatus:
        status = self._local.of(ref)
        entry = self._reconciler.catalog.get(ref.canonical)
        if entry is None:
            return status
        plan = Replicas(
            target=entry.replicas,
            owners=tuple(self._reconciler.owners(ref.canonical)),
            spare=self._reconciler.demoted(ref.canonical),
        )
        return dataclasses.replace(status, replicas=plan)

    def known(self, *, all: bool = False) -> list[ModelRef]:  # noqa: A002 - the API's ?all=1
        return self._local.known(all=all)

    def counts(self) -> dict[JobState, int]:
        return self._local.counts()


@dataclass(frozen=True, slots=True, kw_only=True)
class Holding:
    """One node's copy of a model: ready, or in flight with the bytes it has so far."""

    node_id: str
    state: JobState  # READY, or QUEUED/FETCHING
    bytes_done: int
    bytes_total: int

    @property
    def ready(self) -> bool:
        return self.state is JobState.READY


def holding_in(node_id: str, canonical: str, holdings: NodeHoldings, manifest: Manifest | None) -> Holding | None:
    """What ``holdings`` (one node's, from gossip) says of the model ``canonical``: ready when
    its ref is there; in flight when it has a partial of one of the manifest's files (counted
    by verified pieces, plus the files it already holds complete); else None. Pure."""
    total = manifest.total_bytes if manifest is not None else 0
    if canonical in holdings.refs:
        return Holding(node_id=node_id, state=JobState.READY, bytes_done=total, bytes_total=total)
    if manifest is None:
        return None  # which partials belong to the model is not known here
    in_flight, done = False, 0
    for f in manifest.files:
        if f.blob.hex in holdings.blobs:
            done += f.size
            continue
        partial = holdings.partials.get(_partial_key(f))
        if partial is not None:
            in_flight = True
            done += sum(
                min(partial.piece_size, partial.size - i * partial.piece_size)
                for i in partial.pieces
                if 0 <= i * partial.piece_size < partial.size
            )
    if not in_flight:
        return None
    return Holding(node_id=node_id, state=JobState.FETCHING, bytes_done=min(done, total), bytes_total=total)


def _partial_key(f: FileEntry) -> str:
    """The key a node fetching this file keeps its partial under (``OriginFile.key``)."""
    identity = f.origin.get("identity")
    return OriginFile(path=f.path, size=f.size, identity=identity).key if identity else ""


class Locator:
    """Cluster-wide answers to "who holds this model, and how far along".

    ``holders`` answers from what this node already knows -- its own status and the holdings
    gossip brought in -- so a scheduler asking once per pod costs no request per peer: a ready
    copy is a ref in a node's holdings; a copy in flight is a partial of one of the model's files
    (the manifest, when this node does not hold it, is fetched once from a ready holder and kept
    by digest). It lags the truth by a gossip round. ``locate`` asks every live member for its
    status instead, for the rate behind an ETA, and names each node's zone and rack (from its
    gossiped labels; null when it has none).
    """

    def __init__(
        self,
        *,
        node_id: str,
        status: StatusSource,
        store: Store,
        membership: Membership,
        view: HoldingsView,
        client: PeerClient,
        timeout_s: float = 2.0,
    ) -> None:
        self._node_id = node_id
        self._status = status
        self._store = store
        self._membership = membership
        self._view = view
        self._client = client
        self._timeout_s = timeout_s
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()  # digest -> a peer's manifest

    def labels(self) -> dict[str, Mapping[str, str]]:
        """Node id -> its labels (``zone``, ``rack``, ...) as gossip carries them: this node and
        every member not yet dead."""
        out: dict[str, Mapping[str, str]] = {self._node_id: self._membership.me.labels}
        for m in self._membership.members():
            if m.status is not Status.DEAD:
                out[m.info.node_id] = m.info.labels
        return out

    def zones(self) -> dict[str, str]:
        """Node id -> its zone, for the nodes ``labels`` knows that have one."""
        return {n: z for n, labels in self.labels().items() if (z := labels.get(ZONE_LABEL))}

    async def locate(self, ref: ModelRef) -> list[dict[str, Any]]:
        async def ask(node_id: str, address: str) -> dict[str, Any] | None:
            try:
                answer = await asyncio.wait_for(self._client.status(address, ref.canonical), self._timeout_s)
                return {**answer, "node_id": node_id}
            except Exception as e:  # noqa: BLE001 - an unreachable member is simply not listed
                log.debug("locate: no answer node=%s error=%s", node_id, e)
                return None

        labels = self.labels()
        answers = [{**self._status.of(ref).to_json(), "node_id": self._node_id}]
        if ref.kind is not RefKind.FILE:  # a file:// ref names a path on this node only
            answers += await asyncio.gather(*(ask(m.info.node_id, m.info.address) for m in self._membership.alive()))
        out = []
        for a in answers:
            if not a or a.get("state") not in ("ready", "fetching", "queued"):
                continue
            total, done, rate = (
                int(a.get("bytes_total") or 0),
                int(a.get("bytes_done") or 0),
                float(a.get("rate_bps") or 0),
            )
            eta = 0.0 if a["state"] == "ready" else (round((total - done) / rate, 1) if rate > 0 and total else None)
            where = labels.get(a["node_id"], {})
            out.append(
                {
                    "node_id": a["node_id"],
                    "state": a["state"],
                    "bytes_done": done,
                    "bytes_total": total,
                    "eta_s": eta,
                    "zone": where.get(ZONE_LABEL),
                    "rack": where.get(RACK_LABEL),
                }
            )
        return sorted(out, key=lambda n: (n["state"] != "ready", -n["bytes_done"], n["node_id"]))

    def refs(self) -> set[str]:
        """The refs live members hold ready, as gossip says (canonical spellings, unchecked: a
        peer's holdings are its word; parse before use)."""
        alive = {m.info.node_id for m in self._membership.alive()}
        return {ref for node_id, h in self._view.nodes() if node_id in alive for ref in h.refs}

    async def holders(self, ref: ModelRef, *, ask_peers: bool = True) -> dict[str, Holding]:
        """Node id -> its copy of ``ref`` (ready or in flight), this node and live members.
        ``ask_peers`` False: no request at all; copies in flight elsewhere show only when this
        node already has or remembers the model's manifest (the status page's grid)."""
        out: dict[str, Holding] = {}
        local = self._status.of(ref)
        if local.state is JobState.READY or local.in_flight:
            out[self._node_id] = Holding(
                node_id=self._node_id, state=local.state, bytes_done=local.bytes_done, bytes_total=local.bytes_total
            )
        if ref.kind is RefKind.FILE:
            return out
        alive = {m.info.node_id: m.info.address for m in self._membership.alive()}
        nodes = [(n, h) for n, h in self._view.nodes() if n in alive]
        manifest = await self._manifest(
            ref, [(alive[n], h.refs[ref.canonical]) for n, h in nodes if ref.canonical in h.refs], ask_peers
        )
        for node_id, h in nodes:
            held = holding_in(node_id, ref.canonical, h, manifest)
            if held is not None:
                out[node_id] = held
        return out

    async def _manifest(self, ref: ModelRef, ready: list[tuple[str, str]], ask_peers: bool = True) -> Manifest | None:
        """The model's manifest as ready holders name it ((address, digest) pairs): one this node
        has or remembers, else one fetched from a holder; None when nobody can say."""
        own = self._store.ref_digest(ref)
        for digest in [d for _, d in ready] + ([own] if own else []):
            found = self._store.manifest(digest) or self._manifests.get(digest)
            if found is not None:
                return found
        if not ask_peers:
            return None
        for address, digest in ready[:MANIFEST_ASKS]:
            try:
                manifest = Manifest.from_bytes(
                    await asyncio.wait_for(self._client.manifest(address, digest), self._timeout_s),
                    expect_digest=digest,
                )
            except Exception as e:  # noqa: BLE001 - another holder may answer; else in-flight copies go unseen
                log.debug("holders: no manifest from address=%s digest=%s error=%s", address, digest, e)
                continue
            if manifest.ref != ref.canonical:
                continue
            self._manifests[digest] = manifest
            while len(self._manifests) > MANIFESTS_KEPT:
                self._manifests.popitem(last=False)
            return manifest
        return None
