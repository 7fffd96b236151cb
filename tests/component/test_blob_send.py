"""``cached.api.blobsend.send_blob`` on a real aiohttp server on loopback, plain and TLS.

Over plain TCP the kernel sends the span (sendfile); over TLS asyncio cannot, and the helper reads
the span through ``VerifiedFile`` instead. Either way the client gets exactly the bytes of the span
and the counter sees exactly the bytes sent. A partial blob's descriptor is never handed out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cached.api.blobsend import SLICE, send_blob
from cached.errors import StoreError
from cached.store.verified import VerifiedFile
from tests.support.tls import self_signed
from tests.support.wait import wait_until

DATA = os.urandom(SLICE + (3 << 20) + 7)  # more than one sendfile slice, not a multiple of a chunk


def tls_context(d: Path) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate (Debian package openssl)")
    cert, key = self_signed(d)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


@contextlib.asynccontextmanager
async def server(blob: Path, counted: list[int], tls: ssl.SSLContext | None) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        start, end = (int(x) for x in request.query["span"].split("-"))
        with VerifiedFile(fd=os.open(blob, os.O_RDONLY), size=len(DATA)) as source:
            resp = web.StreamResponse(headers={"Content-Length": str(end - start)})
            await resp.prepare(request)
            if await send_blob(request, resp, source, start, end - start, counted.append) == end - start:
                await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/blob", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/blob"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("use_tls", [False, True], ids=["sendfile", "tls-reads"])
async def test_a_span_arrives_byte_identical_and_counted_exactly(
    tmp_path: Path, use_tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(DATA)
    counted: list[int] = []
    # A spy, not a stand-in: the real os.sendfile runs; we only see whether the kernel path was taken.
    kernel_calls: list[int] = []
    real_sendfile = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        kernel_calls.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", spy)
    tls = tls_context(tmp_path) if use_tls else None
    async with server(blob, counted, tls) as url, aiohttp.ClientSession() as s:
        for start, end in ((0, len(DATA)), (12345, SLICE + 99), (len(DATA) - 5, len(DATA))):
            counted.clear()
            async with s.get(url, params={"span": f"{start}-{end}"}, ssl=False) as r:
                assert r.status == 200 and await r.read() == DATA[start:end]
            # The handler counts a slice once sendfile returns, which may be just after the client read it.
            n = end - start
            await wait_until(lambda n=n: sum(counted) >= n, timeout_s=10, what="the span counted")
            assert sum(counted) == n
    if use_tls:
        assert not kernel_calls, "TLS: asyncio cannot sendfile; the span went through reads"
    else:
        assert kernel_calls, "plain TCP: the kernel sent the span"


def test_a_partial_blob_does_not_hand_out_its_descriptor(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"x" * 8)
    with VerifiedFile(fd=os.open(tmp_path / "p", os.O_RDONLY), size=8, piece_size=4, done={0: b"d"}) as partial:
        with pytest.raises(StoreError):
            partial.fileno()
    complete = VerifiedFile(fd=os.open(tmp_path / "p", os.O_RDONLY), size=8)
    assert complete.fileno() >= 0
    complete.close()
    with pytest.raises(StoreError):
        complete.fileno()
