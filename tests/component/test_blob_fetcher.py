"""BlobFetcher.fetch_blob and ModelFetcher repair against a real origin on 127.0.0.1 and a real Store."""

from __future__ import annotations

import asyncio
import os
import stat
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from cached.config import HttpOriginConfig, StoreConfig, TransferConfig
from cached.errors import OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.metrics import Metrics
from cached.origins import Origins
from cached.origins.http import HttpOrigin
from cached.origins.local import LocalOrigin
from cached.rangeio import ThreadedRangeReader
from cached.store import Store
from cached.transfer.blob import BlobFetcher
from cached.transfer.model import ModelFetcher, Progress
from cached.types import BlobId, ModelRef, OriginFile, RefKind, hash_piece, piece_count, piece_span
from tests.support.corrupt import flip_byte
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

PIECE = 65536
SIZE = 24 * PIECE + 4321  # 25 pieces, the last one short
CONNECTIONS = 4


@dataclass
class Env:
    origin: Origin
    data: bytes
    store: Store
    http: HttpOrigin
    blobs: BlobFetcher
    metrics: Metrics
    cfg: TransferConfig

    @property
    def ref(self) -> ModelRef:
        return ModelRef.parse(self.origin.file_url("model.gguf"))

    async def resolve(self) -> OriginFile:
        (f,) = (await self.http.resolve(self.ref)).files
        return f

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def config(**kw) -> TransferConfig:
    base = dict(connections=CONNECTIONS, backoff_s=0.01, backoff_max_s=0.05, retries=5)
    base.update(kw)
    return TransferConfig(**base)


HTTP = HttpOriginConfig(connect_timeout_s=5.0, read_timeout_s=10.0)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    data = write_random_file(tmp_path / "www" / "model.gguf", SIZE, seed=11).read_bytes()
    store = Store(StoreConfig(cache_dir=tmp_path / "cache", piece_size_bytes=PIECE, max_bytes=64 << 20))
    await store.open()
    cfg = config()
    metrics = Metrics()
    reader = ThreadedRangeReader(
        connect_timeout_s=HTTP.connect_timeout_s, read_timeout_s=HTTP.read_timeout_s, user_agent="test"
    )
    async with Origin(tmp_path / "www") as origin, aiohttp.ClientSession() as session:
        yield Env(origin, data, store, HttpOrigin(session, HTTP, reader), BlobFetcher(cfg, metrics), metrics, cfg)
    reader.close()


class Tally:
    """on_bytes callback: bytes reported per source."""

    def __init__(self) -> None:
        self.by_source: Counter[str] = Counter()

    def __call__(self, source: str, nbytes: int) -> None:
        self.by_source[source] += nbytes


async def fetch_to_blob(env: Env, f: OriginFile, tally: Tally | None = None) -> bytes:
    """fetch_blob into a store partial, publish it, return the published bytes."""
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        await env.blobs.fetch_blob(partial, f, env.http, on_bytes=tally or Tally())
        assert partial.complete
        blob = await env.store.finalize(partial)
    return await asyncio.to_thread(env.store.blob_path(blob.hex).read_bytes)


def expected_ranges(size: int, indices) -> set[str]:
    out = set()
    for i in indices:
        off, length = piece_span(i, size, PIECE)
        out.add(f"{off}-{off + length - 1}")
    return out


# --- ranged path ---------------------------------------------------------------------------------


async def test_happy_path_reads_each_byte_once_and_gives_identical_bytes(env: Env) -> None:
    f = await env.resolve()
    tally = Tally()
    assert await fetch_to_blob(env, f, tally) == env.data
    c = env.origin.counters
    assert c.bytes_sent == SIZE  # no piece fetched twice
    assert len(c.ranges) == piece_count(SIZE, PIECE)
    assert set(c.ranges) == expected_ranges(SIZE, range(piece_count(SIZE, PIECE)))
    assert tally.by_source == {"origin": SIZE}
    assert env.sample("cached_fetched_bytes_total", source="origin") == SIZE
    assert env.sample("cached_origin_errors_total", kind="5xx") == 0


async def test_ranges_run_in_parallel_up_to_the_connection_limit(env: Env) -> None:
    f = await env.resolve()
    env.origin.faults.delay_s = 0.5  # hold every body back so the requests overlap
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        task = asyncio.create_task(env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally()), name="test:fetch")
        try:
            await wait_until(lambda: env.origin.counters.gets >= CONNECTIONS, timeout_s=10, what="parallel GETs")
            # Every allowed request is in flight before the first one finished, and no more.
            assert env.origin.counters.gets == CONNECTIONS
            assert not partial.done
            env.origin.faults.delay_s = 0.0
            await task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        blob = await env.store.finalize(partial)
    assert env.store.blob_path(blob.hex).read_bytes() == env.data
    assert env.origin.counters.bytes_sent == SIZE


async def test_503s_are_retried_and_counted(env: Env) -> None:
    f = await env.resolve()
    env.origin.faults.fail_first, env.origin.faults.fail_status = 3, 503
    assert await fetch_to_blob(env, f) == env.data
    assert env.sample("cached_origin_errors_total", kind="5xx") == 3
    assert env.origin.counters.gets == piece_count(SIZE, PIECE) + 3
    assert env.origin.counters.bytes_sent == SIZE


async def test_retries_run_out(env: Env) -> None:
    cfg = config(retries=2)
    blobs = BlobFetcher(cfg, env.metrics)
    f = await env.resolve()
    env.origin.faults.fail_first, env.origin.faults.fail_status = 10_000, 502
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        with pytest.raises(OriginError) as info:
            await blobs.fetch_blob(partial, f, env.http, on_bytes=Tally())
        assert info.value.status == 502 and info.value.retryable
        assert not partial.done
    # One piece gave up after 1 + retries attempts; the others were cancelled, none went further.
    assert 3 <= env.origin.counters.gets <= CONNECTIONS * 3


@pytest.mark.parametrize(("status", "error"), [(404, OriginNotFound), (403, OriginDenied)])
async def test_permanent_error_fails_fast(env: Env, status: int, error: type) -> None:
    f = await env.resolve()
    env.origin.faults.status = status
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        with pytest.raises(error):
            await env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally())
        assert not partial.done
    # No retries: at most the first wave of requests reached the origin, once each.
    assert 1 <= env.origin.counters.gets <= CONNECTIONS
    # The first answer ends the blob; requests already on the wire are cancelled, not counted.
    assert 1 <= env.sample("cached_origin_errors_total", kind="4xx") <= env.origin.counters.gets
    assert env.sample("cached_origin_errors_total", kind="5xx") == 0


async def test_truncated_bodies_are_retried(env: Env) -> None:
    f = await env.resolve()
    env.origin.faults.truncate_after, env.origin.faults.truncate_times = 1000, 2
    assert await fetch_to_blob(env, f) == env.data
    assert env.origin.faults.truncate_times == 0
    assert env.sample("cached_origin_errors_total", kind="connection") == 2
    assert env.origin.counters.bytes_sent == SIZE + 2 * 1000
    assert env.sample("cached_fetched_bytes_total", source="origin") == SIZE


async def test_resume_fetches_only_missing_pieces(env: Env) -> None:
    f = await env.resolve()
    have = [0, 1, 2, 10, 24]
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        for i in have:
            off, length = piece_span(i, SIZE, PIECE)
            await asyncio.to_thread(partial.write_piece_sync, i, env.data[off : off + length])
    # A later run (same key) picks up where the first stopped.
    tally = Tally()
    assert await fetch_to_blob(env, f, tally) == env.data
    missing = [i for i in range(piece_count(SIZE, PIECE)) if i not in have]
    assert set(env.origin.counters.ranges) == expected_ranges(SIZE, missing)
    assert env.origin.counters.bytes_sent == tally.by_source["origin"] == SIZE - 4 * PIECE - 4321


async def test_file_changed_mid_fetch_fails_with_origin_changed(env: Env) -> None:
    f = await env.resolve()
    env.origin.faults.change_after_gets = 2
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        with pytest.raises(OriginChanged):
            await env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally())
        assert len(partial.done) <= 2
    assert env.origin.counters.gets <= 2 + CONNECTIONS  # not retried


async def test_bytes_that_do_not_match_expected_digests_are_refused(env: Env) -> None:
    f = await env.resolve()
    wrong = [hash_piece(b"other %d" % i) for i in range(piece_count(SIZE, PIECE))]
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        with pytest.raises(OriginChanged, match="does not match"):
            await env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally(), expected=wrong)
        assert not partial.done
    assert env.sample("cached_piece_verify_failures_total", source="origin") >= 1


async def test_origin_gone_mid_fetch_fails_retryable_after_retries_and_keeps_verified_pieces(env: Env) -> None:
    f = await env.resolve()
    have = [0, 5]
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        for i in have:
            off, length = piece_span(i, SIZE, PIECE)
            await asyncio.to_thread(partial.write_piece_sync, i, env.data[off : off + length])
    await env.origin.stop()  # nothing listens on the port any more
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        with pytest.raises(OriginError) as info:
            await env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally())
        assert info.value.retryable
        assert f"127.0.0.1:{env.origin.port}" in info.value.message
        assert sorted(partial.done) == have
    assert env.sample("cached_origin_errors_total", kind="connection") >= env.cfg.retries + 1


async def test_cancelled_fetch_leaves_a_resumable_partial(env: Env) -> None:
    f = await env.resolve()
    env.origin.faults.rate_bps = 512 * 1024  # slow enough to cancel in the middle
    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        task = asyncio.create_task(env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally()), name="test:fetch")
        try:
            await wait_until(lambda: len(partial.done) >= 3, timeout_s=20, interval_s=0.01, what="three pieces")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert not partial.complete
    env.origin.faults.rate_bps = None
    env.origin.reset()

    async with env.store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        kept = sorted(partial.done)
        assert len(kept) >= 3
        await env.blobs.fetch_blob(partial, f, env.http, on_bytes=Tally())
        blob = await env.store.finalize(partial)
    assert env.store.blob_path(blob.hex).read_bytes() == env.data
    missing = [i for i in range(piece_count(SIZE, PIECE)) if i not in kept]
    assert set(env.origin.counters.ranges) == expected_ranges(SIZE, missing)
    assert len(env.origin.counters.ranges) == len(missing)


async def test_local_origin_gives_identical_bytes_and_catches_a_change_during_import(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "src" / "w.bin", SIZE, seed=12)
    data = src.read_bytes()
    store = Store(StoreConfig(cache_dir=tmp_path / "cache", piece_size_bytes=PIECE, max_bytes=64 << 20))
    await store.open()
    blobs = BlobFetcher(config(), Metrics())
    origin = LocalOrigin()
    (f,) = (await origin.resolve(ModelRef.parse(f"file://{src}"))).files
    tally = Tally()
    async with store.partial(key=f.key, size=f.size, piece_size=PIECE, identity_key=f.key) as partial:
        await blobs.fetch_blob(partial, f, origin, on_bytes=tally)
        blob = await store.finalize(partial)
    assert store.blob_path(blob.hex).read_bytes() == data
    assert tally.by_source == {"origin": SIZE}
    assert not os.path.samefile(store.blob_path(blob.hex), src)  # a copy, never a link to the user's file

    with open(src, "ab") as fh:  # the user edits the file after it was resolved
        fh.write(b"tail")
    (g,) = (await origin.resolve(ModelRef.parse(f"file://{src}"))).files
    with open(src, "ab") as fh:
        fh.write(b"more")
    async with store.partial(key=g.key, size=g.size, piece_size=PIECE, identity_key=g.key) as partial:
        with pytest.raises(OriginChanged):
            await blobs.fetch_blob(partial, g, origin, on_bytes=Tally())


# --- stream path (no Range) ----------------------------------------------------------------------


async def test_server_without_ranges_uses_one_stream(env: Env) -> None:
    env.origin.faults.no_ranges = True
    f = await env.resolve()
    assert not env.http.supports_ranges(f)
    env.origin.reset()
    tally = Tally()
    assert await fetch_to_blob(env, f, tally) == env.data
    assert env.origin.counters.gets == 1 and env.origin.counters.ranges == []
    assert env.origin.counters.bytes_sent == SIZE
    assert tally.by_source == {"origin": SIZE}


async def test_stream_restarts_after_a_cut_and_keeps_verified_pieces(env: Env) -> None:
    env.origin.faults.no_ranges = True
    f = await env.resolve()
    env.origin.reset()
    env.origin.faults.truncate_after, env.origin.faults.truncate_times = 3 * PIECE + 100, 1
    tally = Tally()
    assert await fetch_to_blob(env, f, tally) == env.data
    assert env.origin.counters.gets == 2
    assert env.sample("cached_origin_errors_total", kind="connection") == 1
    # The three pieces verified before the cut are not written or counted again.
    assert tally.by_source == {"origin": SIZE}
    assert env.sample("cached_fetched_bytes_total", source="origin") == SIZE


async def test_zero_byte_file(env: Env) -> None:
    (env.origin.root / "empty.bin").write_bytes(b"")
    (f,) = (await env.http.resolve(ModelRef.parse(env.origin.file_url("empty.bin")))).files
    assert f.size == 0
    assert await fetch_to_blob(env, f) == b""


# --- verify and repair ---------------------------------------------------------------------------


async def fetched_model(env: Env) -> tuple[ModelFetcher, BlobId]:
    fetcher = ModelFetcher(env.store, Origins({RefKind.HTTP: env.http}), env.blobs, env.metrics)
    rec = await fetcher.fetch(env.ref, Progress())
    (entry,) = rec.manifest.files
    assert env.origin.counters.bytes_sent == SIZE
    env.origin.reset()
    return fetcher, entry.blob


async def test_verify_refetches_only_the_bad_pieces(env: Env) -> None:
    fetcher, blob = await fetched_model(env)
    blob_path = env.store.blob_path(blob.hex)
    flip_byte(blob_path, 3 * PIECE + 17, 0x5A)
    flip_byte(blob_path, 11 * PIECE, 0x5A)
    flip_byte(blob_path, SIZE - 1, 0x5A)  # the short last piece

    report = await fetcher.verify(env.ref)

    assert report.errors == ()
    assert report.bad_pieces == 3 and report.repaired_blobs == 1
    assert report.checked_bytes == SIZE
    assert env.origin.counters.bytes_sent == 2 * PIECE + 4321
    assert set(env.origin.counters.ranges) == expected_ranges(SIZE, [3, 11, 24])
    assert env.sample("cached_verify_bad_pieces_total") == 3
    # Same blob id, repaired bytes, and the launcher's view follows the new inode.
    assert blob_path.read_bytes() == env.data
    assert stat.S_IMODE(blob_path.stat().st_mode) == 0o440
    view = env.store.view_path(env.ref) / "model.gguf"
    assert os.path.samefile(view, blob_path)
    assert view.read_bytes() == env.data
    assert await env.store.verify_blob(blob.hex) == (SIZE, [])

    env.origin.reset()
    again = await fetcher.verify(env.ref)
    assert again.bad_pieces == 0 and env.origin.counters.bytes_sent == 0


async def test_repair_blob_reads_only_the_named_pieces(env: Env) -> None:
    fetcher, blob = await fetched_model(env)
    flip_byte(env.store.blob_path(blob.hex), 7 * PIECE + 1, 0x5A)
    rec = env.store.model(env.ref)
    assert rec is not None
    await fetcher.repair_blob(env.ref, rec.manifest.files[0], [7])
    assert env.origin.counters.ranges == [f"{7 * PIECE}-{8 * PIECE - 1}"]
    assert env.origin.counters.bytes_sent == PIECE
    assert env.store.blob_path(blob.hex).read_bytes() == env.data
    assert not any(env.store.partial_dir.iterdir())


async def test_repair_fails_cleanly_when_the_origin_changed(env: Env) -> None:
    fetcher, blob = await fetched_model(env)
    flip_byte(env.store.blob_path(blob.hex), 5 * PIECE, 0x5A)
    # The origin now serves other bytes under a still-matching validator: digests catch it.
    write_random_file(env.origin.root / "model.gguf", SIZE, seed=99)
    rec = env.store.model(env.ref)
    assert rec is not None
    entry = rec.manifest.files[0]
    stale = {**entry.origin, "etag": Origin.etag_of(env.origin.root / "model.gguf")}
    report_entry = type(entry)(path=entry.path, size=entry.size, blob=entry.blob, origin=stale)
    with pytest.raises(OriginChanged):
        await fetcher.repair_blob(env.ref, report_entry, [5])
    # The stored blob is untouched: still damaged only where it was, and still published.
    assert (await env.store.verify_blob(blob.hex))[1] == [5]
    assert env.store.model(env.ref) is not None


# --- a fetch that reuses a stored file -----------------------------------------------------------


async def test_fetch_reusing_a_stored_file_survives_eviction_of_the_model_that_brought_it(tmp_path: Path) -> None:
    """file:///src/x.bin, then file:///src (x.bin + y.bin) in a full cache: x.bin's blob is reused.

    Making room for y.bin evicts the least recently used model, file:///src/x.bin; the blob the
    running fetch holds for x.bin must survive that, or the fetch fails at publish time.
    """
    src = tmp_path / "src"
    x = write_random_file(src / "x.bin", 3 * PIECE, seed=1).read_bytes()
    y = write_random_file(src / "y.bin", 3 * PIECE, seed=2).read_bytes()
    write_random_file(tmp_path / "other" / "z.bin", 3 * PIECE, seed=3)
    now = [1000.0]
    store = Store(
        StoreConfig(cache_dir=tmp_path / "cache", piece_size_bytes=PIECE, max_bytes=8 * PIECE), clock=lambda: now[0]
    )
    await store.open()
    metrics = Metrics()
    fetcher = ModelFetcher(store, Origins({RefKind.FILE: LocalOrigin()}), BlobFetcher(config(), metrics), metrics)

    single = ModelRef.parse(f"file://{src}/x.bin")
    other = ModelRef.parse(f"file://{tmp_path}/other")
    whole = ModelRef.parse(f"file://{src}")
    await fetcher.fetch(single, Progress())
    now[0] += 10
    await fetcher.fetch(other, Progress())
    now[0] += 10
    assert store.used_bytes == 6 * PIECE

    progress = Progress()
    rec = await fetcher.fetch(whole, progress)

    assert progress.resumed == len(x)  # x.bin came from the store, not the origin
    assert (rec.path / "x.bin").read_bytes() == x
    assert (rec.path / "y.bin").read_bytes() == y
    assert store.used_bytes <= store.capacity_bytes
