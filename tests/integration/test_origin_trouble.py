"""An HTTP origin in trouble: down, slow, failing for a while, failing for good, or changing the file.

Each case runs a real daemon against the test origin on 127.0.0.1 with faults injected there (or,
for "down", with nothing listening on the port at all). What must hold every time: the failure is
reported clearly (failed state, an error code and a message naming the cause), transient failures
are retried with backoff and counted in ``cached_origin_errors_total``, verified pieces survive a
failed attempt, and nothing is ever published from a mixture of two versions of a file -- a later
prefetch gives exactly the bytes the origin serves now.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from cached.daemon import Daemon
from cached.store.partial import read_piece_log
from cached.types import ModelRef, piece_span
from tests.integration.test_bitrot import assert_store_sound
from tests.support.cluster import MIB, metric, prefetch
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

PIECE = 256 * 1024
SIZE = 4 * MIB + 77  # 17 pieces, the last one short
PIECES = 17
RETRIES = 3
FLAGS = {"store.piece_size_bytes": "256K", "origins.http.retries": RETRIES}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def failed_prefetch(d: Daemon, ref: str) -> ApiError:
    async with ApiClient(d.api_address) as api:
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    return e.value


async def status(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        return await api.request("GET", "/v1/models/status", params={"ref": ref})


async def origin_errors(d: Daemon, kind: str) -> float:
    return await metric(d, "cached_origin_errors_total", kind=kind)


async def failed(d: Daemon, ref: str) -> dict[str, Any] | None:
    st = await status(d, ref)
    return st if st["state"] == "failed" else None


async def finished(d: Daemon, ref: str) -> dict[str, Any] | None:
    st = await status(d, ref)
    return st if st["state"] in ("ready", "failed") else None


async def more_errors(d: Daemon, kind: str, than: float) -> bool:
    return await origin_errors(d, kind) > than


def assert_nothing_published(d: Daemon, ref: str) -> None:
    escaped = ModelRef.parse(ref).escaped
    assert d.store.model(ModelRef.parse(ref)) is None
    assert not (d.store.refs_dir / escaped).exists(), "a ref was written for a failed fetch"
    assert not (d.store.models_dir / escaped).exists(), "a view was built for a failed fetch"
    assert not [p for p in d.store.blobs_dir.rglob("*") if p.is_file()], "a blob was published for a failed fetch"


def kept_bytes(d: Daemon) -> int:
    """Bytes of the pieces recorded in the partials on disk (thread)."""
    total = 0
    for log_path in d.store.partial_dir.glob("*.pieces"):
        header, records = read_piece_log(log_path)
        total += sum(piece_span(i, header.size, header.piece_size)[1] for i in records)
    return total


@contextlib.asynccontextmanager
async def origin_on(root: Path, port: int = 0) -> AsyncIterator[Origin]:
    origin = await Origin(root).start(port)
    try:
        yield origin
    finally:
        await origin.stop()


async def dead_port() -> int:
    """A loopback port nothing listens on (an origin that was there a moment ago)."""
    async with origin_on(Path("/nonexistent")) as gone:
        return gone.port


# --- down ----------------------------------------------------------------------------------------


async def test_origin_down_fails_clearly_then_works_once_it_is_back(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=501)
    port = await dead_port()
    ref = f"http://127.0.0.1:{port}/model.bin"
    async with running_daemon(tmp_path / "n", **FLAGS) as d:
        err = await failed_prefetch(d, ref)
        assert (err.status, err.code) == (502, "origin_error")
        assert f"cannot connect to 127.0.0.1:{port}" in err.message, err.message
        st = await status(d, ref)
        assert st["state"] == "failed" and f"127.0.0.1:{port}" in st["error"], st
        assert_nothing_published(d, ref)

        async with origin_on(src.parent, port):
            model = await prefetch(d, ref)
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == await asyncio.to_thread(
            sha256, src
        )


async def test_origin_going_down_mid_download_keeps_verified_pieces_for_the_retry(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=502)
    flags = {**FLAGS, "origins.http.connections": 4}
    async with running_daemon(tmp_path / "n", **flags) as d:
        async with origin_on(src.parent) as origin:
            origin.faults.rate_bps = 1 * MIB
            port, ref = origin.port, origin.file_url("model.bin")
            async with ApiClient(d.api_address) as api:
                await api.request("POST", "/v1/prefetch", body={"ref": ref})
            await wait_until(lambda: len(origin.counters.ranges) >= 8, timeout_s=10, what="a few pieces requested")
            # the fault: the server goes away (requests in flight finish, new ones are refused)
        before = await origin_errors(d, "connection")
        st = await wait_until(lambda: failed(d, ref), timeout_s=15, what="the fetch to give up")
        assert "cannot connect" in st["error"], st
        assert await origin_errors(d, "connection") >= before + RETRIES + 1, (
            "every attempt of the last piece was counted"
        )
        assert_nothing_published(d, ref)
        kept = await asyncio.to_thread(kept_bytes, d)
        assert 0 < kept < SIZE, kept

        async with origin_on(src.parent, port) as back:
            model = await prefetch(d, ref)
        assert back.counters.bytes_sent == SIZE - kept, "only the pieces not verified before were fetched"
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == await asyncio.to_thread(
            sha256, src
        )
        await asyncio.to_thread(assert_store_sound, d)


@pytest.mark.parametrize("fault", ["down", "503"])
async def test_a_failing_resolve_is_retried_and_counted_as_an_origin_error(tmp_path: Path, fault: str) -> None:
    """The HEAD that resolves an http ref is an origin request like any other: its failures are
    retried with backoff and belong in ``cached_origin_errors_total``, as the pieces' do."""
    write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=510)
    kind = "connection" if fault == "down" else "5xx"
    async with contextlib.AsyncExitStack() as stack:
        if fault == "down":
            ref = f"http://127.0.0.1:{await dead_port()}/model.bin"
        else:
            origin = await stack.enter_async_context(origin_on(tmp_path / "origin"))
            origin.faults.status = 503
            ref = origin.file_url("model.bin")
        d = await stack.enter_async_context(running_daemon(tmp_path / "n", **FLAGS))
        err = await failed_prefetch(d, ref)
        assert err.code == "origin_error"
        if fault == "503":
            assert "HTTP 503" in err.message, err.message
            assert origin.counters.heads == 3, "the resolve was tried three times"
        assert await origin_errors(d, kind) >= 3, (
            f"failed resolves are not counted in cached_origin_errors_total{{kind={kind!r}}}"
        )


# --- slow ----------------------------------------------------------------------------------------


async def test_a_slow_origin_times_out_and_is_retried_until_it_answers(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=503)
    flags = {**FLAGS, "origins.http.read_timeout_s": 0.3}
    async with origin_on(src.parent) as origin, running_daemon(tmp_path / "n", **flags) as d:
        ref = origin.file_url("model.bin")
        origin.faults.delay_s = 1.0  # every body starts after 1 s: longer than the read timeout

        err = await failed_prefetch(d, ref)
        assert (err.status, err.code) == (502, "origin_error")
        assert "timed out" in err.message, err.message
        assert await origin_errors(d, "connection") >= RETRIES + 1
        assert_nothing_published(d, ref)

        # Slow again at first, then the origin recovers while the fetch is retrying.
        async with ApiClient(d.api_address) as api:
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
        seen = await origin_errors(d, "connection")
        await wait_until(
            lambda: more_errors(d, "connection", seen), timeout_s=10, what="a timeout in the second attempt"
        )
        origin.faults.delay_s = 0.0
        model = await prefetch(d, ref)
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == await asyncio.to_thread(
            sha256, src
        )
        await asyncio.to_thread(assert_store_sound, d)


# --- 5xx -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fail_status", "kind"), [(503, "5xx"), (429, "throttled")])
async def test_errors_for_a_while_are_retried_and_the_fetch_succeeds(
    tmp_path: Path, fail_status: int, kind: str
) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=504)
    failures = 5
    async with origin_on(src.parent) as origin, running_daemon(tmp_path / "n", **FLAGS) as d:
        origin.faults.fail_first, origin.faults.fail_status = failures, fail_status
        model = await prefetch(d, origin.file_url("model.bin"))
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == await asyncio.to_thread(
            sha256, src
        )
        assert model["sources"] == {"peer": 0, "origin": SIZE}
        assert await origin_errors(d, kind) == failures, "each failed request counted once"
        assert origin.counters.gets == PIECES + failures, "each failure retried once; no piece fetched twice"
        assert origin.counters.bytes_sent == SIZE
        await asyncio.to_thread(assert_store_sound, d)


async def test_errors_forever_fail_with_the_status_and_publish_nothing(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=505)
    async with origin_on(src.parent) as origin, running_daemon(tmp_path / "n", **FLAGS) as d:
        ref = origin.file_url("model.bin")
        origin.faults.fail_first, origin.faults.fail_status = 10**9, 500  # every GET; HEAD still works

        err = await failed_prefetch(d, ref)
        assert (err.status, err.code) == (502, "origin_error")
        assert "HTTP 500" in err.message, err.message
        st = await status(d, ref)
        assert st["state"] == "failed" and st["error_code"] == "origin_error" and "HTTP 500" in st["error"], st
        assert await origin_errors(d, "5xx") >= RETRIES + 1
        assert origin.counters.gets >= RETRIES + 1
        assert_nothing_published(d, ref)
        assert await asyncio.to_thread(kept_bytes, d) == 0, "no piece could be verified"

        origin.faults.fail_first = 0
        model = await prefetch(d, ref)
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == await asyncio.to_thread(
            sha256, src
        )


# --- the file changes under the same URL ---------------------------------------------------------


async def test_a_new_validator_mid_download_stops_the_fetch_and_the_next_one_starts_clean(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=506)
    async with (
        origin_on(src.parent) as origin,
        running_daemon(tmp_path / "n", **{**FLAGS, "origins.http.connections": 2}) as d,
    ):
        ref = origin.file_url("model.bin")
        origin.faults.change_after_gets = 6  # from the 7th GET on, the ETag is a new one

        err = await failed_prefetch(d, ref)
        assert (err.status, err.code) == (409, "origin_changed")
        assert "changed" in err.message, err.message
        assert_nothing_published(d, ref)
        stale = await asyncio.to_thread(kept_bytes, d)
        assert 0 < stale < SIZE, "the pieces of the old version are kept apart, under the old identity"

        sent = origin.counters.bytes_sent
        model = await prefetch(d, ref)
        assert origin.counters.bytes_sent - sent == SIZE, (
            "the new version is fetched whole: no piece of the old one is reused"
        )
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == await asyncio.to_thread(
            sha256, src
        )


def rewrite_in_place(path: Path, size: int, seed: int, *, truncate: bool) -> str:
    """New content at the same path and inode, as an in-place upload does. Returns its sha256."""
    staged = write_random_file(path.with_name(".staged"), size, seed=seed)
    data = staged.read_bytes()
    staged.unlink()
    with open(path, "wb" if truncate else "r+b") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


async def test_a_file_rewritten_in_place_with_a_new_size_mid_download_is_never_mixed(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.bin", SIZE, seed=507)
    async with (
        origin_on(src.parent) as origin,
        running_daemon(tmp_path / "n", **{**FLAGS, "origins.http.connections": 4}) as d,
    ):
        ref = origin.file_url("model.bin")
        origin.faults.rate_bps = 1 * MIB
        async with ApiClient(d.api_address) as api:
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
        await wait_until(lambda: len(origin.counters.ranges) >= 6, timeout_s=10, what="the download under way")
        new_sha = await asyncio.to_thread(rewrite_in_place, src, SIZE + 3 * PIECE + 5, 508, truncate=True)

        st = await wait_until(lambda: failed(d, ref), timeout_s=15, what="the fetch to notice the change")
        assert st["error_code"] == "origin_changed" and "changed" in st["error"], st
        assert_nothing_published(d, ref)

        origin.faults.rate_bps = None
        model = await prefetch(d, ref)
        assert model["bytes_total"] == SIZE + 3 * PIECE + 5
        assert await asyncio.to_thread(sha256, Path(model["path"]) / "model.bin") == new_sha, "exactly the new bytes"


async def test_a_file_rewritten_in_place_while_its_last_pieces_are_on_the_wire_is_never_published_mixed(
    tmp_path: Path,
) -> None:
    """The hardest moment: every range is already requested (with If-Range, which the server
    checked before the change), and the bodies still streaming read the new content."""
    size = 8 * PIECE
    src = write_random_file(tmp_path / "origin" / "model.bin", size, seed=509)
    old_sha = await asyncio.to_thread(sha256, src)
    async with (
        origin_on(src.parent) as origin,
        running_daemon(tmp_path / "n", **{**FLAGS, "origins.http.connections": 4}) as d,
    ):
        ref = origin.file_url("model.bin")
        origin.faults.rate_bps = 512 * 1024  # half a second per piece
        async with ApiClient(d.api_address) as api:
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
        await wait_until(
            lambda: len(origin.counters.ranges) >= 8, timeout_s=10, interval_s=0.01, what="every piece requested"
        )
        new_sha = await asyncio.to_thread(rewrite_in_place, src, size + PIECE, 510, truncate=False)

        st = await wait_until(lambda: finished(d, ref), timeout_s=15, what="the fetch to end")
        if st["state"] == "ready":
            got = await asyncio.to_thread(sha256, Path(st["path"]) / "model.bin")
            assert got in (old_sha, new_sha), "published a file made of two versions of the origin's content"
        else:
            assert st["error_code"] == "origin_changed", st
            assert_nothing_published(d, ref)
