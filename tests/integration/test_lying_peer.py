"""A lying peer: wrong bytes, cut bodies, a stall mid-body, or 500s, on every piece it is asked for.

The liar L is a real daemon whose peer API sits behind a small reverse proxy written here: L
advertises the proxy's address (``peer.advertise``), so every other node dials the proxy, which
forwards ``/p2p/v1/*`` to L unchanged (gossip, holdings, manifests, piece tables) except the
ranged reads of blobs and partials, where it injects the fault. The downloader D also knows an
honest holder H. Whatever L does, D must finish with the right bytes, all from peers; ban L after
``PEER_FAULT_LIMIT`` faults (the proxy then sees no more piece requests, even for another model);
count the refused bytes in ``cached_piece_verify_failures_total{source="peer"}``; and never write
a wrong byte into ``blobs/``.

``test_p2p_faults.py`` corrupts a holder's blob on disk (so the peer serves what it has); here the
peer's disk is sound and the lie happens on the wire, in the four ways a broken or hostile node or
middlebox lies.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cached.transfer.blob import PEER_FAULT_LIMIT, BlobFetcher
from tests.integration.test_bitrot import assert_store_sound
from tests.support.cluster import (
    MIB,
    blob_holders,
    blobs_of,
    metric,
    node_flags,
    prefetch,
    sha256_tree,
    token_file,  # noqa: F401 - the fixture
    view_digests,
)
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

SIZE = 4 * MIB + 99  # 17 pieces of 256 KiB
PIECE_FLAG = "256K"
STALL_TIMEOUT_S = 0.5
# Requests D keeps in flight to one peer for one blob (the BlobFetcher's default).
PEER_LIMIT = inspect.signature(BlobFetcher.__init__).parameters["peer_limit"].default
_PIECE_READ = re.compile(r"^/p2p/v1/(blobs|partials)/[^/]+$")


class LyingProxy:
    """A reverse proxy in front of one node's peer API that lies about piece bytes on demand."""

    def __init__(self) -> None:
        self.upstream: str | None = None  # host:port of the real peer API
        self.mode: str | None = None  # None (honest), "flip", "truncate", "stall", "500"
        self.piece_reads = 0  # ranged GETs of blobs/partials that reached the proxy
        self.lies = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> LyingProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._released.set()  # stalled handlers return
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.upstream is None:
            return web.Response(status=503, text="proxy not wired yet\n")
        piece_read = request.method == "GET" and "Range" in request.headers and bool(_PIECE_READ.match(request.path))
        mode = self.mode if piece_read else None
        if piece_read:
            self.piece_reads += 1
        if mode == "500":
            self.lies += 1
            return web.json_response({"error": "internal", "message": "injected"}, status=500)
        assert self._session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("range", "content-type") or k.lower().startswith("x-cached-")
        }
        body = await request.read()
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{request.rel_url}",
            headers=headers,
            data=body or None,
        ) as up:
            data = await up.read()
            status = up.status
            # The node's signed-answer headers pass through: the proxy lies in the bytes only.
            out = {
                k: up.headers[k]
                for k in ("Content-Type", "Content-Range", "Retry-After", "X-Cached-Node", "X-Cached-Answer")
                if k in up.headers
            }
        if mode is None or status != 206 or not data:
            return web.Response(status=status, body=data, headers=out)
        self.lies += 1
        if mode == "flip":
            wrong = bytearray(data)
            wrong[len(wrong) // 2] ^= 0x01  # one bit: the length and the headers are all correct
            return web.Response(status=206, body=bytes(wrong), headers=out)
        resp = web.StreamResponse(status=206, headers={**out, "Content-Length": str(len(data))})
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        if mode == "truncate":
            assert request.transport is not None
            request.transport.close()  # half the promised body, then the connection drops
            return resp
        assert mode == "stall"
        await self._released.wait()  # half the body, then silence with the connection open
        return resp


def peer_api_port(caplog: pytest.LogCaptureFixture, node_id: str) -> str:
    """The real address a node's peer API listens on (it advertises another: the proxy's)."""
    for r in caplog.records:
        m = re.match(rf"peers on node={re.escape(node_id)} peer_api=(\S+) ", r.getMessage())
        if m:
            return m.group(1)
    raise AssertionError(f"node {node_id} never logged its peer API address")


@pytest.mark.parametrize("mode", ["flip", "truncate", "stall", "500"])
async def test_a_lying_peer_is_banned_and_the_download_is_exact(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    srcs = [write_random_file(tmp_path / "origin" / f"m{i}.bin", SIZE, seed=400 + i) for i in range(2)]
    want = await asyncio.to_thread(sha256_tree, srcs[0].parent)
    caplog.set_level(logging.INFO, logger="cached")
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(srcs[0].parent))
        proxy = await stack.enter_async_context(LyingProxy())
        h = await stack.enter_async_context(
            running_daemon(tmp_path / "h", node_id="h", **node_flags(token_file, piece=PIECE_FLAG))
        )
        liar = await stack.enter_async_context(
            running_daemon(
                tmp_path / "l",
                node_id="l",
                **node_flags(token_file, h, piece=PIECE_FLAG, **{"peer.advertise": proxy.address}),
            )
        )
        assert liar.peer_address == proxy.address
        proxy.upstream = peer_api_port(caplog, "l")

        # L fetches both models from the origin; H takes them from L through the (honest) proxy.
        refs, blobs = [], []
        for src in srcs:
            model_l = await prefetch(liar, origin.file_url(src.name))
            model_h = await prefetch(h, model_l["ref"])
            assert model_h["sources"] == {"peer": SIZE, "origin": 0}, "H read L through the proxy"
            refs.append(model_l["ref"])
            blobs.append(blobs_of(liar, model_l)[src.name])
        assert proxy.piece_reads >= 2 * 17 and proxy.lies == 0

        # A stalled read is given up after peer.stall_timeout_s (PeerClient's read timeout).
        stall = {"peer.stall_timeout_s": STALL_TIMEOUT_S}
        d = await stack.enter_async_context(
            running_daemon(tmp_path / "d", node_id="d", **node_flags(token_file, h, piece=PIECE_FLAG, **stall))
        )
        for blob in blobs:
            await wait_until(
                lambda blob=blob: blob_holders(d, blob) == {"h", "l"},
                timeout_s=10,
                what="d learns h and l hold both blobs",
            )
        proxy.mode = mode
        reads_before, origin_gets = proxy.piece_reads, (origin.counters.gets, origin.counters.bytes_sent)

        model0 = await prefetch(d, refs[0])

        assert await view_digests(model0) == {srcs[0].name: want[srcs[0].name]}
        assert model0["sources"] == {"peer": SIZE, "origin": 0}, model0["sources"]
        banned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("peer banned")]
        assert banned and all("peer=l " in m for m in banned), banned
        # L got at most PEER_LIMIT requests at once; once PEER_FAULT_LIMIT of them failed it was
        # banned, with at most PEER_LIMIT - 1 others already on the wire.
        asked = proxy.piece_reads - reads_before
        assert PEER_FAULT_LIMIT <= proxy.lies == asked <= PEER_FAULT_LIMIT + PEER_LIMIT - 1, (asked, proxy.lies)
        refused = await metric(d, "cached_piece_verify_failures_total", source="peer")
        if mode == "flip":
            assert refused >= PEER_FAULT_LIMIT, "every wrong piece was caught by its BLAKE3"
        else:
            assert refused == 0, "cut, stalled and failed reads are faults, not wrong bytes"

        # Banned for every blob: the other model comes from H alone, L's proxy sees no request.
        reads_after_ban = proxy.piece_reads
        model1 = await prefetch(d, refs[1])
        assert await view_digests(model1) == {srcs[1].name: want[srcs[1].name]}
        assert model1["sources"] == {"peer": SIZE, "origin": 0}
        assert proxy.piece_reads == reads_after_ban, "d asked the banned peer again"
        # d names each ref at the origin (one HEAD each: names come from origins), nothing more.
        assert (origin.counters.gets, origin.counters.bytes_sent) == origin_gets, (
            "an honest peer had it all: no byte from the origin"
        )
        await asyncio.to_thread(assert_store_sound, d)
        print(f"\nlying peer mode={mode}: piece reads to L={asked} lies={proxy.lies} refused_by_blake3={refused:.0f}")
