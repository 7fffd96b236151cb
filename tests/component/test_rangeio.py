"""ThreadedRangeReader against real aiohttp servers on 127.0.0.1: bytes, reuse, errors, abort."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cached.config import HttpOriginConfig
from cached.errors import OriginChanged, OriginError
from cached.origins.http import HttpOrigin
from cached.rangeio import RangeIOError, Redirected, ThreadedRangeReader
from cached.types import ModelRef, OriginFile
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

SIZE = 3 << 20


def accept_206(status: int, headers: object) -> None:
    if status != 206:
        raise RuntimeError(f"status {status}")


@pytest.fixture
async def reader() -> AsyncIterator[ThreadedRangeReader]:
    r = ThreadedRangeReader(connect_timeout_s=2.0, read_timeout_s=0.5, user_agent="test")
    yield r
    r.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Origin, bytes]]:
    data = write_random_file(tmp_path / "www" / "f.bin", SIZE, seed=7).read_bytes()
    async with Origin(tmp_path / "www") as origin:
        yield origin, data


class Server:
    """A hand-made server for what the test origin cannot do: redirects, slow bodies that notice
    the client leaving, and the set of client ports seen."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.peers: set[int] = set()
        self.auth: list[str | None] = []  # the Authorization header of each /file request
        self.client_gone = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, **runner_kw: object) -> Server:
        app = web.Application()
        app.router.add_get("/moved", self._moved)
        app.router.add_get("/moved-far", self._moved_far)
        app.router.add_get("/moved-utf8", self._moved_utf8)
        app.router.add_get("/dl/{name}", self._file)
        app.router.add_get("/chunked", self._chunked)
        app.router.add_get("/file", self._file)
        app.router.add_get("/slow", self._slow)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_kw)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _span(self, request: web.Request) -> tuple[int, int]:
        first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
        return int(first), int(last)

    async def _moved(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/file"})

    async def _moved_far(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def _moved_utf8(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/dl/f\u00efle.bin"})

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)  # no Content-Length: chunked, Range ignored
        await resp.prepare(request)
        await resp.write(self.data)
        await resp.write_eof()
        return resp

    async def _file(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport.get_extra_info("peername")[1])
        self.auth.append(request.headers.get("Authorization"))
        first, last = self._span(request)
        return web.Response(
            status=206,
            body=self.data[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{len(self.data)}"},
        )

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        first, last = self._span(request)
        resp = web.StreamResponse(
            status=206,
            headers={
                "Content-Range": f"bytes {first}-{last}/{len(self.data)}",
                "Content-Length": str(last - first + 1),
            },
        )
        await resp.prepare(request)
        try:
            for pos in range(first, last + 1, 64 << 10):  # bounded: one pass over the range
                await resp.write(self.data[pos : min(pos + (64 << 10), last + 1)])
                await asyncio.sleep(0.02)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            self.client_gone.set()
            return resp
        return resp

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_a_range_arrives_in_order_at_its_offsets_and_the_connection_is_reused(
    reader: ThreadedRangeReader,
) -> None:
    server = await Server(bytes(range(256)) * (SIZE // 256)).start()
    try:
        out = bytearray(SIZE)
        calls: list[tuple[int, int]] = []

        def sink(data: memoryview, pos: int) -> None:
            calls.append((pos, len(data)))
            out[pos : pos + len(data)] = data

        for off in range(0, SIZE, 1 << 20):
            await reader.read_into(server.url("/file"), off, 1 << 20, sink, check=accept_206, batch=64 << 10)
        assert bytes(out) == server.data
        assert [p for p, _ in calls] == sorted(p for p, _ in calls), "batches in order"
        assert max(n for _, n in calls) <= 64 << 10
        assert len(server.peers) == 1, "one kept-alive connection for requests one after another"
    finally:
        await server.stop()


async def test_a_connection_the_server_closed_while_idle_is_replaced_silently(reader: ThreadedRangeReader) -> None:
    server = await Server(b"x" * SIZE).start(keepalive_timeout=0.05)
    try:
        assert await reader.read(server.url("/file"), 0, 1000, check=accept_206) == b"x" * 1000
        await wait_until(
            lambda: not server.runner.server.connections, timeout_s=5, what="the server to drop the idle connection"
        )
        assert await reader.read(server.url("/file"), 1000, 1000, check=accept_206) == b"x" * 1000
        assert len(server.peers) == 2
    finally:
        await server.stop()


async def test_a_cancelled_read_never_calls_its_sink_again_and_drops_the_connection(
    reader: ThreadedRangeReader,
) -> None:
    server = await Server(b"y" * SIZE).start()
    try:
        calls = [0]

        def sink(data: memoryview, pos: int) -> None:
            calls[0] += 1

        task = asyncio.create_task(
            reader.read_into(server.url("/slow"), 0, SIZE, sink, check=accept_206, batch=16 << 10)
        )
        await wait_until(lambda: calls[0] >= 3, timeout_s=10, what="the body to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = calls[0]
        # The server finds the socket shut: the worker thread was woken, not left to read on.
        await asyncio.wait_for(server.client_gone.wait(), timeout=10)
        assert calls[0] == seen, "the sink ran after read_into was cancelled"
    finally:
        await server.stop()


async def test_a_redirect_is_reported_and_the_http_origin_follows_it(
    reader: ThreadedRangeReader, tmp_path: Path
) -> None:
    server = await Server(bytes(range(256)) * 4096).start()
    try:
        with pytest.raises(Redirected) as e:
            await reader.read(server.url("/moved"), 0, 10, check=accept_206)
        assert (e.value.status, e.value.location) == (302, "/file")
        async with aiohttp.ClientSession() as session:
            origin = HttpOrigin(session, HttpOriginConfig(), reader)
            moved = OriginFile(
                path="f", size=len(server.data), identity="x", checksums={"ranges": "1"}, locator=server.url("/moved")
            )
            assert await origin.read_range(moved, 256, 512) == server.data[256:768]
    finally:
        await server.stop()


async def test_transport_failures_are_typed(reader: ThreadedRangeReader, served: tuple[Origin, bytes]) -> None:
    origin, data = served
    url = origin.file_url("f.bin")

    origin.faults.truncate_after, origin.faults.truncate_times = 100_000, 1
    with pytest.raises(RangeIOError) as e:
        await reader.read(url, 0, 1 << 20, check=accept_206)
    assert e.value.kind == "incomplete"

    origin.faults.delay_s = 2.0  # longer than the 0.5 s read timeout
    with pytest.raises(RangeIOError) as e:
        await reader.read(url, 0, 1000, check=accept_206)
    assert e.value.kind == "timeout" and "timed out" in str(e.value)
    origin.faults.delay_s = 0.0

    origin.faults.no_ranges = True
    with pytest.raises(RangeIOError) as e:
        await reader.read(url, 1000, 1000, check=lambda status, headers: None)
    assert e.value.kind == "ignored-range"
    origin.faults.no_ranges = False

    with pytest.raises(RangeIOError) as e:
        await reader.read("http://127.0.0.1:99999/f.bin", 0, 10, check=accept_206)
    assert e.value.kind == "protocol" and "bad URL" in str(e.value)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(RangeIOError) as e:
        await reader.read(f"http://127.0.0.1:{closed_port}/f.bin", 0, 10, check=accept_206)
    assert e.value.kind == "connect"

    # A refusal raised by the caller's check comes out unchanged, and the reader still works.
    origin.faults.status = 403
    with pytest.raises(RuntimeError, match="status 403"):
        await reader.read(url, 0, 10, check=accept_206)
    origin.faults.status = None
    assert await reader.read(url, 5, 10, check=accept_206) == data[5:15]


async def test_the_http_origin_takes_a_whole_file_answer_to_a_range_as_a_changed_file(
    reader: ThreadedRangeReader, served: tuple[Origin, bytes]
) -> None:
    origin, data = served
    async with aiohttp.ClientSession() as session:
        http = HttpOrigin(session, HttpOriginConfig(), reader)
        file = (await http.resolve(ModelRef.parse(origin.file_url("f.bin")))).files[0]
        assert await http.read_range(file, 10, 20) == data[10:30]
        origin.faults.no_ranges = True  # If-Range no longer honoured: a 200 with the whole file
        with pytest.raises(OriginChanged) as e:
            await http.read_range(file, 10, 20)
        assert not e.value.retryable


async def test_a_cancel_while_a_batch_is_in_the_sink_returns_only_after_that_batch(reader: ThreadedRangeReader) -> None:
    server = await Server(b"y" * SIZE).start()
    try:
        inside, state = threading.Event(), {"running": False}

        def sink(data: memoryview, pos: int) -> None:
            state["running"] = True
            inside.set()
            time.sleep(0.3)  # a slow disk
            state["running"] = False

        task = asyncio.create_task(reader.read_into(server.url("/slow"), 0, SIZE, sink, check=accept_206))
        await asyncio.to_thread(inside.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not state["running"], "read_into returned while its sink was still writing"
    finally:
        await server.stop()


async def test_a_refused_answer_with_its_body_unread_does_not_poison_the_pool(reader: ThreadedRangeReader) -> None:
    server = await Server(bytes(range(256)) * (SIZE // 256)).start()
    try:

        def refuse(status: int, headers: object) -> None:
            raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            await reader.read(server.url("/file"), 0, 1 << 20, check=refuse)  # 1 MiB left unread
        assert await reader.read(server.url("/file"), 10, 10, check=accept_206) == server.data[10:20]
    finally:
        await server.stop()


async def test_bad_redirect_targets_are_clear_errors_and_raw_utf8_locations_are_followed(
    reader: ThreadedRangeReader,
) -> None:
    server = await Server(bytes(range(256)) * 4096).start()
    try:
        async with aiohttp.ClientSession() as session:
            origin = HttpOrigin(session, HttpOriginConfig(), reader)

            def file_at(path: str) -> OriginFile:
                return OriginFile(
                    path="f", size=len(server.data), identity="x", checksums={"ranges": "1"}, locator=server.url(path)
                )

            assert await origin.read_range(file_at("/moved-utf8"), 100, 50) == server.data[100:150]
            with pytest.raises(OriginError, match="bad URL"):
                await origin.read_range(file_at("/moved-far?to=http://127.0.0.1:99999/x"), 0, 10)
    finally:
        await server.stop()


async def test_credentials_in_the_url_go_to_that_origin_only_and_no_message_shows_a_signed_query(
    reader: ThreadedRangeReader, served: tuple[Origin, bytes]
) -> None:
    home, far = await Server(bytes(range(256)) * 4096).start(), await Server(bytes(range(256)) * 4096).start()
    try:
        async with aiohttp.ClientSession() as session:
            origin = HttpOrigin(session, HttpOriginConfig(), reader)
            url = f"http://user:secret@127.0.0.1:{home.port}"
            file = OriginFile(
                path="f", size=len(home.data), identity="x", checksums={"ranges": "1"}, locator=f"{url}/file"
            )
            assert await origin.read_range(file, 0, 10) == home.data[:10]
            assert home.auth == ["Basic dXNlcjpzZWNyZXQ="]  # base64 of user:secret
            away = OriginFile(
                path="f",
                size=len(home.data),
                identity="x",
                checksums={"ranges": "1"},
                locator=f"{url}/moved-far?to={far.url('/file')}",
            )
            assert await origin.read_range(away, 0, 10) == far.data[:10]
            assert far.auth == [None], "credentials never follow a redirect to another origin"
    finally:
        await home.stop()
        await far.stop()

    slow, _ = served
    slow.faults.delay_s = 2.0  # past the 0.5 s read timeout
    with pytest.raises(RangeIOError) as e:
        await reader.read(slow.file_url("f.bin") + "?X-Amz-Signature=SIGNED", 0, 10, check=accept_206)
    assert e.value.kind == "timeout" and "SIGNED" not in str(e.value), str(e.value)


async def test_a_whole_file_answer_without_length_serves_a_range_at_offset_zero_only(
    reader: ThreadedRangeReader,
) -> None:
    server = await Server(bytes(range(256)) * 4096).start()
    try:
        ok = lambda status, headers: None  # noqa: E731
        assert await reader.read(server.url("/chunked"), 0, 1000, check=ok) == server.data[:1000]
        with pytest.raises(RangeIOError) as e:
            await reader.read(server.url("/chunked"), 1000, 1000, check=ok)
        assert e.value.kind == "ignored-range"
    finally:
        await server.stop()
