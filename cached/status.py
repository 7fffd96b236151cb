"""What state a model is in on this node: one query, answered as a frozen ``ModelStatus``.

``StatusBoard.of(ref)`` joins the ref's latest job (queued, fetching, failed, with its live
progress and rate) with what the store holds (the ready copy, its paths and the older revisions
leases still keep) and the claims on it (pin, leases). The local API serialises the value
(``ModelStatus.to_json``, the model object of the API contract), the peer API answers it to
cluster-wide locate, and the Kubernetes extender scores this node by it. The cluster's replica
plan for a ref (``replicas``) is not known here: ``cached.cluster`` fills it in.

A ready model pulled through ``/hf`` that lacks some of its commit's files says so (``partial``,
``files_held``, ``files_missing``); a fetching one carries ``bytes_in_flight``, the bytes that
arrived and are not verified yet, apart from ``bytes_done``.

The precedence, in one place: an active job wins (a refresh of a ready model shows its
progress); else a ready copy; else a failed job; else absent -- a finished job of a model since
evicted says nothing any more. Nothing here does I/O or changes state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cached.jobs import Jobs
from cached.store import Store, msview
from cached.store.claims import Lease
from cached.types import JobState, Manifest, ModelRef, RefKind


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceBytes:
    """Bytes fetched to make a copy, by where they came from."""

    peer: int = 0
    origin: int = 0

    def to_json(self) -> dict[str, int]:
        return {"peer": self.peer, "origin": self.origin}


@dataclass(frozen=True, slots=True, kw_only=True)
class Revision:
    """One revision of a ready model on disk: the current one, or an older one leases hold."""

    revision: str | None
    manifest: str  # digest hex
    current: bool
    leases: tuple[str, ...] = ()  # lease ids holding an older revision

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "revision": self.revision,
            "manifest": f"blake3:{self.manifest}",
            "current": self.current,
        }
        if not self.current:
            out["leases"] = list(self.leases)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Replicas:
    """The catalog's plan for a ref: how many copies, which nodes own them, whether ours is spare."""

    target: int
    owners: tuple[str, ...]
    spare: bool

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "owners": list(self.owners), "spare": self.spare}


@dataclass(frozen=True, slots=True, kw_only=True)
class Copy:
    """The ready copy of a model on this node."""

    path: str
    manifest: str  # digest hex
    revision: str | None
    files: int
    last_used: float
    hf_path: str | None = None  # hf refs: the hub-layout cache root and this commit's snapshot
    snapshot_path: str | None = None
    revisions: tuple[Revision, ...] = ()
    modelscope_path: str | None = None  # modelscope refs: the MODELSCOPE_CACHE root of the SDK-layout view
    # A model /hf pulled file by file: the files it holds and, when the hub's listing is known,
    # those it does not hold yet. ``partial`` False: every file of the ref is here.
    partial: bool = False
    held: tuple[str, ...] = ()
    missing: tuple[str, ...] | None = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStatus:
    """One model on this node. ``rate_bps`` is None when no job speaks for the model,
    ``error_code`` when it did not fail, ``copy`` when it is not ready, ``replicas`` outside the
    catalog; each is then left out of the JSON rather than written as null."""

    ref: str
    state: JobState
    bytes_total: int = 0
    bytes_done: int = 0
    pinned: bool = False
    leases: tuple[Lease, ...] = ()
    error: str | None = None
    error_code: str | None = None
    sources: SourceBytes = SourceBytes()
    rate_bps: float | None = None
    bytes_in_flight: int = 0  # arrived, not verified yet (a fetching job only)
    copy: Copy | None = None
    replicas: Replicas | None = None

    @property
    def in_flight(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.FETCHING)

    def to_json(self) -> dict[str, Any]:
        """The model object of the API contract; keys in the order clients have always seen."""
        c = self.copy
        out: dict[str, Any] = {
            "ref": self.ref,
            "state": self.state.value,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "path": c.path if c else None,
            "hf_path": c.hf_path if c else None,
            "manifest": f"blake3:{c.manifest}" if c else None,
            "pinned": self.pinned,
            "leases": [lease.to_json() for lease in self.leases],
            "error": self.error,
            "sources": self.sources.to_json(),
        }
        if self.rate_bps is not None:
            out["rate_bps"] = round(self.rate_bps)
        if self.state is JobState.FETCHING:
            out["bytes_in_flight"] = self.bytes_in_flight
        if self.state is JobState.FAILED:
            out["error_code"] = self.error_code
        if self.replicas is not None:
            out["replicas"] = self.replicas.to_json()
        if c is not None:
            out["revision"] = c.revision
            out["files"] = c.files
            out["last_used"] = c.last_used
            if c.hf_path is not None:
                out["snapshot_path"] = c.snapshot_path
            if c.modelscope_path is not None:
                out["modelscope_path"] = c.modelscope_path
            out["revisions"] = [r.to_json() for r in c.revisions]
            if c.partial:
                # Ready for the files it holds (its path and hf view serve them); not all of the repo.
                out["partial"] = True
                out["files_held"] = list(c.held)
                out["files_missing"] = list(c.missing) if c.missing is not None else None
        return out


class StatusSource(Protocol):
    """Who answers "what state is this model in here" (``StatusBoard``, or the cluster's view
    of it that adds the replica plan)."""

    def of(self, ref: ModelRef) -> ModelStatus: ...

    def known(self, *, all: bool = False) -> list[ModelRef]: ...  # noqa: A002

    def counts(self) -> dict[JobState, int]: ...


class StatusBoard:
    """Answers ``of(ref)`` from jobs, store and claims; lists the models this node knows."""

    def __init__(self, *, store: Store, jobs: Jobs, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._jobs = jobs
        self._clock = clock

    def of(self, ref: ModelRef) -> ModelStatus:
        job = self._jobs.get(ref)
        rec = self._store.model(ref)
        if job is not None and job.active:
            state = job.state
        elif rec is not None:
            state = JobState.READY
        elif job is not None and job.state is JobState.FAILED:
            state = JobState.FAILED
        else:
            # Never fetched, or fetched and since evicted (a finished job says nothing now).
            state, job = JobState.ABSENT, None
        claims = self._store.claims
        status = ModelStatus(
            ref=ref.canonical,
            state=state,
            pinned=claims.is_pinned(ref.canonical),
            leases=tuple(claims.leases_for(ref.canonical)),
        )
        if job is not None:
            p, failed = job.progress, state is JobState.FAILED
            status = dataclasses.replace(
                status,
                bytes_total=p.bytes_total,
                bytes_done=p.bytes_done,
                sources=SourceBytes(peer=p.sources["peer"], origin=p.sources["origin"]),
                rate_bps=job.rate_bps(self._clock()),
                bytes_in_flight=self._jobs.in_flight(job) if state is JobState.FETCHING else 0,
                error=job.error if failed else None,
                error_code=job.error_code if failed else None,
            )
        if rec is not None and state is JobState.READY:
            # What was fetched to make this copy, not what a later no-op prefetch fetched (nothing).
            status = dataclasses.replace(
                status,
                bytes_total=rec.manifest.total_bytes,
                bytes_done=rec.manifest.total_bytes,
                sources=SourceBytes(peer=rec.sources.get("peer", 0), origin=rec.sources.get("origin", 0)),
                copy=self._copy(ref, rec.manifest, path=str(rec.path), last_used=rec.last_used),
            )
        return status

    def _copy(self, ref: ModelRef, manifest: Manifest, *, path: str, last_used: float) -> Copy:
        hf = ref.kind is RefKind.HF
        snapshot = self._store.hf_snapshot(manifest) if hf else None
        current = Revision(revision=manifest.revision, manifest=manifest.digest, current=True)
        # Older revisions that leases still hold (a refresh moved the ref on).
        older = tuple(
            Revision(
                revision=m.revision,
                manifest=m.digest,
                current=False,
                leases=tuple(
                    lease.lease_id for lease in self._store.claims.active_leases() if lease.manifest == m.digest
                ),
            )
            for m in self._store.retained_for(ref)
        )
        missing = self._store.pulled_missing(ref, manifest)
        return Copy(
            path=path,
            manifest=manifest.digest,
            revision=manifest.revision,
            files=len(manifest.files),
            last_used=last_used,
            hf_path=str(self._store.hf_dir) if hf else None,
            snapshot_path=str(snapshot) if hf else None,
            revisions=(current, *older),
            modelscope_path=str(msview.cache_root(self._store.layout)) if ref.kind is RefKind.MODELSCOPE else None,
            partial=missing != (),
            held=tuple(sorted(f.path for f in manifest.files)) if missing != () else (),
            missing=missing,
        )

    def known(self, *, all: bool = False) -> list[ModelRef]:  # noqa: A002 - the API's ?all=1
        """Every ref with a ready copy, an active job or a remembered failure, sorted. A failure
        older than ``jobs.failed_ttl_s`` is left out unless ``all``."""
        now = self._clock()
        refs = {r.ref for r in self._store.models()} | {
            j.ref.canonical
            for j in self._jobs.all()
            if j.active or (j.state is JobState.FAILED and (all or not self._jobs.expired(j, now)))
        }
        return [ModelRef.parse(r) for r in sorted(refs)]

    def counts(self) -> dict[JobState, int]:
        """How many known models are in each state (absent ones are not known)."""
        out = {s: 0 for s in JobState if s is not JobState.ABSENT}
        for ref in self.known():
            state = self.of(ref).state
            if state in out:
                out[state] += 1
        return out
