"""Prefetch jobs: one per ref, queued by priority, with progress, events and cancellation.

A second prefetch of a ref that is queued or fetching joins the existing job (and may raise its
priority); the origin is therefore read once however many launchers ask at the same time. At most
``max_concurrent`` jobs fetch at once; the rest wait in priority order. A failed job is remembered
(state and error) until the ref is prefetched again or evicted; after ``jobs.failed_ttl_s`` it is
no longer listed (``expired``) unless the caller asks for all. Every job task is owned by this
component's TaskGroup and catches its own failures: one bad model never stops the daemon.

A job may carry ``on_ready`` hooks, run in its task once the model is committed (how ``/hf``
folds a one-file fetch into the repo's model). A prefetch of a model ``/hf`` pulled only in part
re-lists the commit and fetches the rest. ``in_flight`` is the progress between verified pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cached.config import JobsConfig
from cached.errors import CachedError, ConflictError, FetchCancelled, NotFoundError
from cached.metrics import Metrics
from cached.store import Store
from cached.transfer.model import ModelFetcher, Progress
from cached.types import JobState, ModelRef, Priority, RefKind

log = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 1024


@dataclass(slots=True, eq=False)
class Job:
    id: int
    ref: ModelRef
    priority: Priority
    created_at: float
    refresh: bool = False
    state: JobState = JobState.QUEUED
    progress: Progress = field(default_factory=Progress)
    error: str | None = None
    error_code: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # Run (in the job's task, before it reports ready) once the model is committed: how /hf
    # folds a one-file fetch into the repo's model. A failing hook is logged, never fatal.
    on_ready: list[Callable[[Job], Awaitable[None]]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.FETCHING)

    def rate_bps(self, now: float) -> float:
        if self.started_at is None:
            return 0.0
        end = self.finished_at or now
        elapsed = end - self.started_at
        fetched = self.progress.bytes_done - self.progress.resumed
        return fetched / elapsed if elapsed > 0.05 and fetched > 0 else 0.0


class Events:
    """Fan-out of job events to subscribers (``GET /v1/events``); a slow subscriber loses events."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, event: dict[str, Any]) -> None:
        for q in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)


class Jobs:
    def __init__(
        self,
        fetcher: ModelFetcher,
        store: Store,
        metrics: Metrics,
        cfg: JobsConfig,
        *,
        clock: Callable[[], float] = time.time,
        progress_interval_s: float = 0.5,
    ) -> None:
        self._fetcher = fetcher
        self._store = store
        self._metrics = metrics
        self._cfg = cfg
        self._clock = clock
        self._progress_interval_s = progress_interval_s
        self._jobs: dict[str, Job] = {}  # canonical ref -> latest job
        self._waiting: list[tuple[int, int, Job]] = []
        self._seq = itertools.count(1)
        self._running = 0
        self._tg: asyncio.TaskGroup | None = None
        self.events = Events()

    async def __aenter__(self) -> Jobs:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._ticker = self._tg.create_task(self._progress_loop(), name="jobs.progress")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._ticker.cancel()
        self._waiting.clear()
        for job in self.active():
            if job.task is not None:
                job.task.cancel("daemon stopping")
        tg, self._tg = self._tg, None
        await tg.__aexit__(None, None, None)

    def reconfigure(self, cfg: JobsConfig) -> None:
        self._cfg = cfg
        self._pump()

    # --- queries -------------------------------------------------------------------------------

    def get(self, ref: ModelRef) -> Job | None:
        return self._jobs.get(ref.canonical)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def active(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.active]

    def in_flight(self, job: Job) -> int:
        """Bytes of a running fetch that arrived and are not verified yet: progress between two
        verified pieces (``bytes_done`` counts only verified bytes, and never goes back)."""
        if job.state is not JobState.FETCHING:
            return 0
        total = 0
        for key in job.progress.partial_keys:
            partial = self._store.open_partial(key)
            total += partial.bytes_arriving if partial is not None else 0
        return total

    # --- commands ------------------------------------------------------------------------------

    def submit(
        self,
        ref: ModelRef,
        priority: Priority = Priority.NORMAL,
        *,
        refresh: bool = False,
        on_ready: Callable[[Job], Awaitable[None]] | None = None,
    ) -> Job:
        job = self._jobs.get(ref.canonical)
        if job is not None and job.active and on_ready is not None and on_ready not in job.on_ready:
            job.on_ready.append(on_ready)
        rec = self._store.model(ref)
        if not refresh and rec is not None and self._store.pulled_missing(ref, rec.manifest) != ():
            # A model /hf pulled file by file holds only part of the repo: a prefetch of it
            # re-lists the commit and fetches the rest (the files held are reused).
            refresh = True
        if job is not None and job.active:
            # A running fetch of a missing model resolves the newest revision anyway; a queued
            # one just takes the refresh along.
            if refresh and job.state is JobState.QUEUED:
                job.refresh = True
            if priority < job.priority:
                job.priority = priority
                if job.state is JobState.QUEUED:
                    self._waiting = [(p if j is not job else int(priority), s, j) for p, s, j in self._waiting]
                    heapq.heapify(self._waiting)
            return job
        job = Job(id=next(self._seq), ref=ref, priority=priority, created_at=self._clock(), refresh=refresh)
        if on_ready is not None:
            job.on_ready.append(on_ready)
        self._jobs[ref.canonical] = job
        heapq.heappush(self._waiting, (int(priority), job.id, job))
        self._emit(job, "queued")
        self._pump()
        return job

    async def wait(self, job: Job, timeout_s: float | None = None) -> bool:
        """True when the job finished (ready or failed) within the timeout."""
        try:
            await asyncio.wait_for(job.done.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def cancel(self, ref: ModelRef, reason: str = "cancelled") -> bool:
        job = self._jobs.get(ref.canonical)
        if job is None or not job.active:
            return False
        if job.task is None:
            self._waiting = [e for e in self._waiting if e[2] is not job]
            heapq.heapify(self._waiting)
            self._finish(job, JobState.FAILED, FetchCancelled(reason))
        else:
            job.task.cancel(reason)
            await asyncio.gather(job.task, return_exceptions=True)
        return True

    async def evict(self, ref: ModelRef, *, force: bool = False) -> int:
        """Cancel any fetch of ``ref``, drop its partial and published bytes. Returns bytes freed."""
        claims = self._store.claims
        if not force:
            if claims.is_pinned(ref.canonical):
                raise ConflictError(f"{ref} is pinned; unpin it or use --force")
            if claims.leases_for(ref.canonical):
                holders = ", ".join(sorted({lease.holder for lease in claims.leases_for(ref.canonical)}))
                raise ConflictError(f"{ref} is leased by {holders}; release the lease or use --force")
        job = self._jobs.get(ref.canonical)
        present = self._store.model(ref) is not None or bool(self._store.retained_for(ref))
        if job is None and not present:
            raise NotFoundError(f"{ref} is not on this node")
        await self.cancel(ref, "evicted")
        if force:
            # Claims go first, so that every revision they held is free to go with the model.
            await claims.unpin(ref)
            for lease in claims.leases_for(ref.canonical):
                await claims.release(lease.lease_id)
        freed = 0
        if job is not None:
            for key in job.progress.partial_keys:
                if self._store.has_partial(key):
                    await self._store.discard_partial(key)
            del self._jobs[ref.canonical]
        if self._store.model(ref) is not None:
            freed = await self._store.remove_model(ref)
            self._metrics.evictions.inc()
        freed += await self._store.release_unretained()
        log.info("evicted ref=%s freed_bytes=%d", ref, freed)
        return freed

    # --- running -------------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._tg is None:
            raise RuntimeError("Jobs used before it was started")
        while self._waiting and self._running < self._cfg.max_concurrent:
            priority, _, job = self._waiting[0]
            # Foreground first: background work (normal/low) never takes the last slot, so a
            # launcher waiting on --wait (high) starts at once even while prefetches run.
            if (
                priority > Priority.HIGH
                and self._cfg.max_concurrent > 1
                and self._background() >= self._cfg.max_concurrent - 1
            ):
                return
            heapq.heappop(self._waiting)
            self._running += 1
            job.task = self._tg.create_task(self._run(job), name=f"job:{job.id}")

    def _background(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state is JobState.FETCHING and j.priority > Priority.HIGH)

    async def _run(self, job: Job) -> None:
        job.state = JobState.FETCHING
        job.started_at = self._clock()
        self._emit(job, "fetching")
        started = time.monotonic()
        try:
            rec = await self._fetcher.fetch(job.ref, job.progress, refresh=job.refresh)
            await self._after_ready(job, rec.manifest.revision)
        except asyncio.CancelledError:
            self._finish(
                job, JobState.FAILED, FetchCancelled("cancelled (the model was evicted or the daemon is stopping)")
            )
            self._metrics.fetch_duration.labels("cancelled").observe(time.monotonic() - started)
        except CachedError as e:
            log.warning("prefetch failed ref=%s error=%s", job.ref, e)
            self._finish(job, JobState.FAILED, e)
            self._metrics.fetch_duration.labels("failed").observe(time.monotonic() - started)
        except Exception as e:  # noqa: BLE001 - one model's bug must not take the daemon down
            log.exception("prefetch crashed ref=%s", job.ref)
            self._finish(job, JobState.FAILED, CachedError(f"internal error: {type(e).__name__}: {e}"))
            self._metrics.fetch_duration.labels("failed").observe(time.monotonic() - started)
        else:
            self._finish(job, JobState.READY, None)
            self._metrics.fetch_duration.labels("ok").observe(time.monotonic() - started)
            log.info(
                "model ready ref=%s bytes=%d origin_bytes=%d peer_bytes=%d seconds=%.2f",
                job.ref,
                job.progress.bytes_total,
                job.progress.sources["origin"],
                job.progress.sources["peer"],
                time.monotonic() - started,
            )
        finally:
            self._running -= 1
            with contextlib.suppress(RuntimeError):
                self._pump()

    async def _after_ready(self, job: Job, commit: str | None) -> None:
        ref = job.ref
        if ref.kind is RefKind.HF and not (ref.include or ref.exclude) and ref.revision == commit:
            # The whole commit is here: a model /hf pulled at it is complete and ordinary now.
            await self._store.note_hf_listing(ref.repo, commit, None)
        for hook in job.on_ready:
            try:
                await hook(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the model is ready whatever a hook does
                log.exception("after-ready step failed ref=%s", ref)

    def expired(self, job: Job, now: float) -> bool:
        """A failed job older than ``jobs.failed_ttl_s``: no longer listed (``GET /v1/models?all=1``
        still shows it; status of its ref still answers failed until it is prefetched again)."""
        ttl = self._cfg.failed_ttl_s
        return job.state is JobState.FAILED and ttl > 0 and job.finished_at is not None and now - job.finished_at > ttl

    def _finish(self, job: Job, state: JobState, error: CachedError | None) -> None:
        job.state = state
        job.finished_at = self._clock()
        if error is not None:
            job.error, job.error_code = error.message, error.code
        result = "ok" if state is JobState.READY else ("cancelled" if isinstance(error, FetchCancelled) else "failed")
        self._metrics.prefetch_jobs.labels(result).inc()
        self._emit(job, state.value)
        job.done.set()

    def _emit(self, job: Job, kind: str) -> None:
        event: dict[str, Any] = {
            "event": kind,
            "ref": job.ref.canonical,
            "state": job.state.value,
            "bytes_total": job.progress.bytes_total,
            "bytes_done": job.progress.bytes_done,
            "time": self._clock(),
        }
        if job.error:
            event["error"] = job.error
        self.events.publish(event)

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self._progress_interval_s)
            now = self._clock()
            for job in self.active():
                if job.state is JobState.FETCHING:
                    self.events.publish(
                        {
                            "event": "progress",
                            "ref": job.ref.canonical,
                            "state": job.state.value,
                            "bytes_total": job.progress.bytes_total,
                            "bytes_done": job.progress.bytes_done,
                            "bytes_in_flight": self.in_flight(job),
                            "rate_bps": round(job.rate_bps(now)),
                            "time": now,
                        }
                    )
