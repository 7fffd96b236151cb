"""StatusBoard over a real store and real jobs: which of job, copy and failure speaks for a model,
and what the status carries for each. The fetcher is an in-memory stand-in (the seam jobs drive):
it holds a fetch open, fails it, or commits a model to the real store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cached.config import JobsConfig
from cached.errors import OriginNotFound
from cached.jobs import Jobs
from cached.metrics import Metrics
from cached.status import StatusBoard
from cached.store import Store
from cached.transfer.model import Progress
from cached.types import JobState, ModelRef, Priority
from tests.component.test_store import PIECE, Clock, add_model, content, opened
from tests.support.wait import wait_until

READY = "https://models.example/ready.gguf"
SLOW = "https://models.example/slow.gguf"
BROKEN = "https://models.example/broken.gguf"


class Fetcher:
    """Holds ``SLOW`` open with some progress until released; fails ``BROKEN``; else no-op."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def fetch(self, ref: ModelRef, progress: Progress, *, refresh: bool = False) -> None:
        if ref.canonical == BROKEN:
            raise OriginNotFound("the origin has no such file")
        progress.bytes_total = 4 * PIECE
        progress.add("origin", PIECE)
        progress.add("peer", 2 * PIECE)
        await self.release.wait()


async def board(tmp_path: Path, clock: Clock) -> tuple[Store, Jobs, StatusBoard, Fetcher]:
    store = await opened(tmp_path / "cache", clock=clock)
    fetcher = Fetcher()
    jobs = Jobs(fetcher, store, Metrics(), JobsConfig(max_concurrent=4), clock=clock)  # type: ignore[arg-type]
    return store, jobs, StatusBoard(store=store, jobs=jobs, clock=clock), fetcher


async def test_absent_ready_pinned_and_leased(tmp_path: Path) -> None:
    clock = Clock()
    store, jobs, statuses, _ = await board(tmp_path, clock)
    async with jobs:
        ref = ModelRef.parse(READY)
        assert statuses.of(ref).state is JobState.ABSENT and statuses.known() == []

        data = content(tmp_path, 2 * PIECE + 7, seed=11)
        _, manifest = await add_model(store, READY, {"w.gguf": data})
        await store.claims.pin(ref)
        lease = await store.claims.take_lease(ref, "vllm@pod-1", 60.0, manifest=manifest.digest)

        s = statuses.of(ref)
        assert s.state is JobState.READY and s.bytes_total == s.bytes_done == len(data)
        assert s.pinned and s.leases == (lease,) and s.rate_bps is None and s.error is None
        assert s.copy is not None and Path(s.copy.path) == store.view_path(ref)
        assert (Path(s.copy.path) / "w.gguf").read_bytes() == data
        assert s.copy.manifest == manifest.digest and s.copy.files == 1 and s.copy.hf_path is None
        assert [r.current for r in s.copy.revisions] == [True]
        assert statuses.known() == [ref]
        assert statuses.counts() == {JobState.QUEUED: 0, JobState.FETCHING: 0, JobState.READY: 1, JobState.FAILED: 0}


async def test_an_active_job_speaks_for_the_model_and_a_failure_only_while_nothing_is_ready(tmp_path: Path) -> None:
    clock = Clock()
    store, jobs, statuses, fetcher = await board(tmp_path, clock)
    async with jobs:
        slow, broken = ModelRef.parse(SLOW), ModelRef.parse(BROKEN)
        job = jobs.submit(slow, Priority.NORMAL)
        await wait_until(lambda: job.progress.bytes_done == 3 * PIECE, timeout_s=5, what="the fetch under way")
        clock.now += 2.0
        s = statuses.of(slow)
        assert s.state is JobState.FETCHING and (s.bytes_done, s.bytes_total) == (3 * PIECE, 4 * PIECE)
        assert (s.sources.origin, s.sources.peer) == (PIECE, 2 * PIECE)
        assert s.rate_bps == 3 * PIECE / 2.0 and s.copy is None
        assert s.to_json()["rate_bps"] == round(3 * PIECE / 2.0)

        failed = jobs.submit(broken, Priority.NORMAL)
        assert await jobs.wait(failed, 5)
        s = statuses.of(broken)
        assert s.state is JobState.FAILED and s.error_code == "origin_not_found" and s.error
        assert statuses.known() == [broken, slow]
        assert statuses.counts()[JobState.FAILED] == 1 and statuses.counts()[JobState.FETCHING] == 1

        # A copy that appears later wins over the remembered failure; once evicted, nothing speaks.
        await add_model(store, BROKEN, {"w.gguf": content(tmp_path, PIECE, seed=12)})
        assert statuses.of(broken).state is JobState.READY and statuses.of(broken).error is None
        await jobs.evict(broken)
        assert statuses.of(broken).state is JobState.ABSENT and statuses.of(broken).to_json()["error"] is None

        fetcher.release.set()
        assert await jobs.wait(job, 5)
